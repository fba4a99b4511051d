// The tensor-core LoRA kernel (mma.sync m16n8k16): the prefill path of fused_moe_lora and
// dense_lora, for float16 / bfloat16 with 16-byte aligned rows, when the (slot, expert) groups
// hold many rows each.
//
// Math, per block b (slot a, expert e, up to block_m pairs) and slice i of rank r = rank_i(a):
//   shrink  s[p, k]    = w[p] * sum_d x[p / input_pairs_per_row, d] * A_i[a, e][k, d]   (k < r)
//   expand  out[p, c_i + j] += sum_k s[p, k] * B_i^T[a, e][k, j]
// fp32 accumulation, s kept at fp32-like precision, one rounding per output element.
//
// At prefill the cost is reading x once and read-modify-writing the outputs once; the adapter
// rows are small and shared by every CTA of a group, so they come from L2. Hence:
//
// Work item: one CTA per (block, M tile, column part); an M tile is 16 rows per warp, 1-4 warps
//   (64 rows when block_m >= 64; fewer warps for small block_m), more tiles per block when
//   block_m is larger. Warp w owns tile rows 16w..16w+15 through both phases, so s never leaves
//   its registers. When blocks are too few to fill the GPU, a thread-block cluster of csplit
//   CTAs (<= 8) shares each (block, M tile): CTA cs shrinks its contiguous share of the K
//   chunks, the partial intermediates are summed through distributed shared memory (fixed
//   order), and CTA cs then expands its share of each slice's 64-column tiles:
//   [nt*cs/csplit, nt*(cs+1)/csplit) of the slice's nt tiles (possibly none). Items run cs
//   fastest (the cluster), then M tile, then block.
// Passes: the slices are packed on the host into passes whose summed ranks, each rounded up to
//   16 (rp_i), fit in N columns (template N in {32, 64, 128}); slice i takes columns
//   [base_i, base_i + rp_i) of its pass. One shrink per pass reads x once for every slice in it
//   (w13: gate and up together).
// Shrink: K chunks of 64 elements, a kStages-deep cp.async pipeline (16-byte copies, zero-fill for
//   padding rows, rows past the rank and the in_dim tail). Stage = X [rows][64] + A rows [N][64],
//   128-byte rows with the 16-byte chunks XOR-swizzled by (row & 7) so that ldmatrix is free of
//   bank conflicts. Per k16 step a warp loads its x fragment (ldmatrix.x4) and, for each pair of
//   n8 tiles that holds ranks of this block (tile mask; mixed ranks skip the rest), the A-row
//   fragments (ldmatrix.x4: A rows are the "col" B operand as stored) and issues the mma.
//   A warp copies its own 16 x rows (lane: one 16-byte chunk of 4 rows, pointers and offsets
//   held in registers for the whole phase); the A rows are copied by the whole CTA.
// Hand-over: the m16n8 accumulators of n tiles (2t, 2t+1) are exactly the A fragment of k tile
//   t of the expand. Each value is scaled by w[p] (columns past the rank are zeroed) and split
//   into hi = T(s) and lo = T(s - hi), two mma per step, so the intermediate keeps ~16 (bf16) /
//   ~22 (fp16) mantissa bits. fp16 rows are also scaled by a power of two (exact) so that
//   max |s| sits at 2^14: no overflow, little underflow of lo.
// Expand: the pass's slices' 64-column tiles, one after another, as further steps of the
//   shrink's pipeline (without a cluster, no drain between the phases). Stage = output tile
//   [rows][64] (prefetched, so the read of the RMW is asynchronous) + B^T tile [rp][64]
//   (rows past the rank zero-filled), both swizzled. B fragments come from ldmatrix.x4.trans.
//   The warp adds its fp32 accumulators into its 16 staged output rows in shared memory (one
//   rounding per element; ldmatrix.x4 / stmatrix.x4 move exactly a lane's accumulator elements),
//   then writes them back with coalesced 16-byte stores; columns past out_dim and padding rows
//   are neither read nor written. Output rows, like x rows, are copied by their own warp.
// Every output element of a pair has one owner (its block's CTA for its column part, its warp,
// one lane): no atomics; sums run in a fixed order for a given csplit, so repeated runs are
// bit-identical. Shared memory: kStages * (rows + N) * 128 bytes of stages (4 stages, 64 rows:
// 96 KB at N = 128, 64 KB at N = 64, 48 KB at N = 32), 20 bytes per tile row and 2.3-2.4 KB of
// adapter row tables (static).
// Code: the kernel walks its items and, per pass, runs the main loop (MmaPass::main_loop: the
// shrink, with the first expand tiles already loading) and the epilogue (MmaPass::epilogue: the
// hand-over and the expand). Tiles and the pipeline: lora/prefill_pipeline.cuh. Measurements:
// docs/performance.md, "Tensor-core kernel".
// Declines (returns false) for float32, unaligned rows, max_rank > 64 or an unaligned arena.
// Assumes each adapter row is 16-byte aligned in its arena (the row layout guarantees it).
// Template space: dtype x N = 6 kernels.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/cluster.cuh"
#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "common/ptx.cuh"
#include "lora/kernels.h"
#include "lora/prefill_pipeline.cuh"
#include "plan_rules.h"

namespace moelora::cuda {

namespace {

using namespace prefill;  // NOLINT: the kernel's own tiles and pipeline

// ---- one CTA: its shared tables and the rows of its current item ------------------------------

// Static shared memory: the plan, the item's ranks and the current pass's row tables.
template <typename T, int N>
struct PassTables {
  // A rows of the pass in load order (null: zero-fill) and their rows in the stage.
  const T* wsrc[kMaxN];
  uint8_t wdst[kMaxN];
  // B^T row k of slice i at base[i] + k (null past the rank: zeros), for every slice of the
  // pass at once: the expand tiles are loaded while the shrink still runs.
  const T* bsrc[kMaxN];
  int32_t lim[N / 8];  // per n tile: end of the valid columns (base + rank)
  int32_t rank[kMaxSlices];
  // Expand steps of the pass: slice i owns steps [first[i], first[i + 1]) (none when it has no
  // rank or this part no tile of it), its tile 0 being column tile tile0[i] of the slice.
  int32_t first[kMaxSlices + 1], tile0[kMaxSlices];
  int32_t base[kMaxSlices], rp[kMaxSlices], pass[kMaxSlices + 1];  // the plan
};

// A CTA's constants and the rows of its current (block, M tile) item.
template <typename T, int N>
struct MmaCta {
  const LoraArgs& a;
  PassTables<T, N>& tb;
  unsigned char* smem;
  int tid, nthreads, lane;
  int r0;    // this warp's first tile row
  int rows;  // 16 rows per warp
  uint32_t stage_bytes, smem0;
  // Per tile row: its input row and output row (null = padding) and routing weight; then the
  // adapter row tables of the item (dynamic shared memory after the stages).
  const T** s_xrow;
  T** s_orow;
  float* s_w;
  int64_t* s_table;
  // Copies: a thread moves 16-byte chunk `ch` of its rows. The x and output tiles are
  // warp-local: lane l copies rows r0 + l / 8 + 4q (q < 4) of its own warp, so an idle warp
  // copies nothing and each lane's row pointers and stage offsets are set once, outside the
  // pipelines (address math per copy would be most of the kernel's instructions). The adapter
  // tiles are shared by the CTA: thread t copies rows t / 8 + k * nthreads / 8.
  int ch;
  uint32_t row_off[4];  // offsets of this lane's 4 rows (chunk ch) in a swizzled tile
  const T* input;
  T* output;
  // The current item's rows, set by take_rows.
  bool warp_active;
  const T* xrow[4];  // this lane's input rows (null: padding, zero-filled)
  T* orow[4];        // this lane's output rows (null: padding, never touched)

  __device__ __forceinline__ MmaCta(const LoraArgs& args, PassTables<T, N>& tables,
                                    unsigned char* shared)
      : a(args), tb(tables), smem(shared) {
    tid = static_cast<int>(threadIdx.x);
    nthreads = static_cast<int>(blockDim.x);
    lane = tid & 31;
    r0 = (tid >> 5) * 16;
    rows = nthreads / 2;
    stage_bytes = static_cast<uint32_t>((rows + N) * kRowBytes);
    s_xrow = reinterpret_cast<const T**>(smem + kStages * stage_bytes);
    s_orow = reinterpret_cast<T**>(smem + kStages * stage_bytes + rows * sizeof(T*));
    s_w = reinterpret_cast<float*>(s_orow + rows);
    s_table = reinterpret_cast<int64_t*>(smem + kStages * stage_bytes + row_tables_bytes(rows));
    ch = lane & 7;
#pragma unroll
    for (int q = 0; q < 4; ++q) row_off[q] = swz(r0 + (lane >> 3) + 4 * q, ch);
    smem0 = smem_u32(smem);
    input = static_cast<const T*>(a.input);
    output = static_cast<T*>(a.output);
  }

  // The rank of slice i (the raw value travels by cp.async; clamped where it is read).
  __device__ __forceinline__ int rank_of(int i) const {
    return max(0, min(tb.rank[i], a.slices[i].max_rank));
  }
  // Adapter row k of slice i (A or B^T) from the staged table.
  __device__ __forceinline__ const T* adapter_row(int i, bool is_b, int k) const {
    return reinterpret_cast<const T*>(a.slices[i].arena +
                                      s_table[(i * 2 + (is_b ? 1 : 0)) * a.rank_stride + k]);
  }

  // Second round trip of block b (group slot, expert), all as cp.async copies so that none
  // waits for another: each slice's rank and its whole row-table entry (not waiting for the
  // rank), and the rows' routing weights; `pair` is this thread's pair of the tile. Returns
  // whether this thread's pair is valid.
  __device__ __forceinline__ bool stage_item(int32_t slot, int32_t expert, int32_t pair) {
    for (int i = 0; i < a.num_slices; ++i) {
      const SliceArgs& s = a.slices[i];
      const bool known = slot >= 0 && slot < s.num_slots && expert >= 0 && expert < s.num_experts;
      if (tid == nthreads - 1 - i) {  // the last warp: the first ones copy the rows below
        if (known) {
          cp_async4(smem_u32(tb.rank + i), s.ranks + slot * s.rank_slot_stride);
        } else {
          tb.rank[i] = 0;
        }
      }
      if (!known) continue;
      const int64_t* table =
          s.row_offsets + slot * s.slot_stride + int64_t{expert} * 2 * s.max_rank;
      for (int j = tid; j < 2 * s.max_rank; j += nthreads) {
        const int is_b = j >= s.max_rank;
        cp_async8(smem_u32(s_table + (i * 2 + is_b) * a.rank_stride + (j - is_b * s.max_rank)),
                  table + j);
      }
    }
    bool valid = false;
    if (tid < rows) {
      valid = pair_valid(a, pair);
      s_xrow[tid] = valid ? input + (pair / a.input_pairs_per_row) * a.input_stride : nullptr;
      s_orow[tid] = valid ? output + int64_t{pair} * a.output_stride : nullptr;
      if (valid && a.weights != nullptr) {
        cp_async4(smem_u32(s_w + tid), a.weights + int64_t{pair} * a.weight_stride);
      } else {
        s_w[tid] = 1.0f;
      }
    }
    cp_async_commit();
    cp_async_wait<0>();
    return valid;
  }

  // This lane's row pointers of the item (after the barrier that follows stage_item).
  __device__ __forceinline__ void take_rows() {
    warp_active = __any_sync(0xffffffffu, lane < 16 && s_xrow[r0 + lane] != nullptr);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      xrow[q] = s_xrow[r0 + (lane >> 3) + 4 * q];
      orow[q] = s_orow[r0 + (lane >> 3) + 4 * q];
    }
  }
};

// What the expand of slice i needs, read once per slice (per-step lookups cost more than the
// pipeline drains they would save): its steps [first, end), this lane's column at step 0
// (column of step = col0 + step * kChunk), its B^T rows and k tiles, its output width and
// column offset.
template <typename T>
struct SliceTiles {
  int first, end, nb, kt0;
  int64_t col0, out_dim, col_offset;
  const T* const* bsrc;
};

// ---- one pass: consecutive slices sharing one read of x ----------------------------------------
template <typename T, int N>
struct MmaPass {
  static constexpr int NT = N / 8;   // n8 tiles of a pass (shrink)
  static constexpr int KT = N / 16;  // k16 tiles of a pass (expand)

  MmaCta<T, N>& c;
  int sb, se;  // the pass's slices [sb, se)
  int64_t cs, csplit;
  int nact;  // A rows to load: the first roundup(rank, 8) of each slice's columns
  uint32_t tile_mask;
  int64_t chunk0;  // this CTA's first K chunk
  int nsh;         // this CTA's K chunks: the shrink steps
  int nsteps;      // shrink and expand steps

  __device__ __forceinline__ MmaPass(MmaCta<T, N>& cta, int begin, int end, int64_t part,
                                     int64_t parts)
      : c(cta), sb(begin), se(end), cs(part), csplit(parts) {}

  // The pass's A and B^T row addresses and its steps, from the staged tables (no memory trip).
  // False when no slice of the pass has a rank for this item (uniform over the cluster).
  __device__ __forceinline__ bool prepare() {
    PassTables<T, N>& tb = c.tb;
    nact = 0;
    tile_mask = 0;
    for (int i = sb; i < se; ++i) {
      const int n8 = (c.rank_of(i) + 7) / 8;
      tile_mask |= ((1u << n8) - 1u) << (tb.base[i] / 8);
      nact += 8 * n8;
    }
    if (nact == 0) return false;
    for (int idx = c.tid; idx < nact; idx += c.nthreads) {
      int i = sb, k = idx;
      while (k >= 8 * ((c.rank_of(i) + 7) / 8)) k -= 8 * ((c.rank_of(i) + 7) / 8), ++i;
      tb.wdst[idx] = static_cast<uint8_t>(tb.base[i] + k);
      tb.wsrc[idx] = k < c.rank_of(i) ? c.adapter_row(i, false, k) : nullptr;
    }
    for (int e = c.tid; e < N; e += c.nthreads) {
      const T* src = nullptr;
      for (int i = sb; i < se; ++i) {
        const int k = e - tb.base[i];
        if (k >= 0 && k < c.rank_of(i)) src = c.adapter_row(i, true, k);
      }
      tb.bsrc[e] = src;
    }
    for (int j = c.tid; j < NT; j += c.nthreads) {
      int lim = 0;
      for (int i = sb; i < se; ++i) {
        if (8 * j >= tb.base[i] && 8 * j < tb.base[i] + tb.rp[i]) lim = tb.base[i] + c.rank_of(i);
      }
      tb.lim[j] = lim;
    }
    // This CTA's share of the K chunks (all of them without a cluster): the shrink steps.
    const int64_t chunks = (c.a.in_dim + kChunk - 1) / kChunk;
    chunk0 = chunks * cs / csplit;
    nsh = static_cast<int>(chunks * (cs + 1) / csplit - chunk0);
    if (c.tid == 0) {
      int step = nsh;
      for (int i = sb; i < se; ++i) {
        tb.first[i] = step;
        if (c.rank_of(i) == 0) continue;
        const TileRange tr = part_tiles(c.a.slices[i].out_dim, cs, csplit);
        tb.tile0[i] = static_cast<int32_t>(tr.begin);
        step += static_cast<int>(tr.end - tr.begin);
      }
      tb.first[se] = step;
    }
    __syncthreads();
    nsteps = tb.first[se];
    return true;
  }

  // ---- copies of one pipeline step ----

  // K chunk c of the shrink: this warp's x rows (the in_dim tail zero-filled) and the pass's A
  // rows.
  __device__ __forceinline__ void load_chunk(int chunk, int stage) const {
    const int64_t d = (chunk0 + chunk) * kChunk + c.ch * 8;
    const bool in = d < c.a.in_dim;
    const uint32_t xs = c.smem0 + stage * c.stage_bytes;
    const uint32_t ws = xs + c.rows * kRowBytes;
    if (c.warp_active) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const bool ok = c.xrow[q] != nullptr && in;
        cp_async16(xs + c.row_off[q], ok ? c.xrow[q] + d : c.input, ok);
      }
    }
    for (int j = c.tid >> 3; j < nact; j += c.nthreads >> 3) {
      const T* src = c.tb.wsrc[j];
      const bool ok = src != nullptr && in;
      cp_async16(ws + swz(c.tb.wdst[j], c.ch), ok ? src + d : c.input, ok);
    }
  }

  // Expand step -> slice (steps of slices without tiles are empty ranges).
  __device__ __forceinline__ int step_slice(int step) const {
    int i = sb;
    while (step >= c.tb.first[i + 1]) ++i;
    return i;
  }

  __device__ __forceinline__ SliceTiles<T> slice_tiles(int i) const {
    SliceTiles<T> st;
    st.first = c.tb.first[i];
    st.end = c.tb.first[i + 1];
    st.nb = 16 * ((c.rank_of(i) + 15) / 16);  // B^T rows: the k tiles holding ranks
    st.kt0 = c.tb.base[i] / 16;               // first k tile of the slice in the pass
    st.col0 = (int64_t{c.tb.tile0[i]} - st.first) * kChunk + c.ch * 8;
    st.out_dim = c.a.slices[i].out_dim;
    st.col_offset = c.a.slices[i].col_offset;
    st.bsrc = c.tb.bsrc + c.tb.base[i];
    return st;
  }

  // An expand step: its B^T tile (rows past the rank zero-filled) and this warp's output rows.
  __device__ __forceinline__ void copy_tile(const SliceTiles<T>& st, int step, int stage) const {
    const int64_t col = st.col0 + int64_t{step} * kChunk;
    const bool in = col < st.out_dim;  // columns past out_dim: never read nor written
    const uint32_t os = c.smem0 + stage * c.stage_bytes;
    const uint32_t bs = os + c.rows * kRowBytes;
    for (int k = c.tid >> 3; k < st.nb; k += c.nthreads >> 3) {
      const T* src = st.bsrc[k];
      const bool ok = src != nullptr && in;
      cp_async16(bs + swz(k, c.ch), ok ? src + col : c.input, ok);
    }
    if (c.warp_active && in) {
      const int64_t at = st.col_offset + col;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (c.orow[q] != nullptr) cp_async16(os + c.row_off[q], c.orow[q] + at, true);
      }
    }
  }

  // A tile of any slice, found by its step: the loads that run ahead into a later slice.
  __device__ __forceinline__ void copy_any_tile(int step, int stage) const {
    copy_tile(slice_tiles(step_slice(step)), step, stage);
  }

  __device__ __forceinline__ void load_step(int step, int stage) const {
    if (step < nsh) load_chunk(step, stage);
    else copy_any_tile(step, stage);
  }

  // acc[j] += this warp's 16 x rows @ A_pass^T, n tile j, over one staged K chunk.
  __device__ __forceinline__ void shrink_chunk(float (&acc)[NT][4], int stage) const {
    if (!c.warp_active) return;
    const int lane = c.lane;
    const uint32_t xs = c.smem0 + stage * c.stage_bytes;
    const uint32_t ws = xs + c.rows * kRowBytes;
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      uint32_t af[4];
      ldsm_x4(af, xs + swz(c.r0 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * ks + (lane >> 4)));
#pragma unroll
      for (int jp = 0; jp < NT / 2; ++jp) {
        const uint32_t pm = (tile_mask >> (2 * jp)) & 3u;
        if (pm == 0) continue;  // tile 2jp+1 active implies tile 2jp active
        uint32_t bf[4];
        ldsm_x4(bf, ws + swz(16 * jp + (lane & 7) + (lane >> 4) * 8, 2 * ks + ((lane >> 3) & 1)));
        mma16816<T>(acc[2 * jp], af, bf[0], bf[1]);
        if (pm & 2u) mma16816<T>(acc[2 * jp + 1], af, bf[2], bf[3]);
      }
    }
  }

  // ---- main loop: the shrink, acc = x_tile (16 rows of this warp) @ A_pass^T ----
  __device__ __forceinline__ void main_loop(float (&acc)[NT][4]) const {
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    const auto load = [this](int step, int stage) { load_step(step, stage); };
    const auto load_k = [this](int chunk, int stage) { load_chunk(chunk, stage); };
    const auto shrink = [this, &acc](int, int stage) { shrink_chunk(acc, stage); };
    if (csplit == 1) {
      // One pipeline: the loads run on into the expand's first tiles.
      pipeline_fill(0, nsteps, load);
      pipeline_steps(0, nsh, nsteps, load, shrink);
    } else {
      // The partial sums meet in the stage memory: drain, sum, then start the expand.
      pipeline_fill(0, nsh, load_k);
      pipeline_steps(0, nsh, nsh, load_k, shrink);
      pipeline_drain();
      cluster_sum(acc, reinterpret_cast<float*>(c.smem));
      const auto load_tile = [this](int step, int stage) { copy_any_tile(step, stage); };
      pipeline_fill(nsh, nsteps, load_tile);
    }
  }

  // ---- epilogue: hand-over and expand ----

  // s = w * acc (zero past the rank) as hi/lo A fragments of the expand; fp16 rows scaled by a
  // power of two (unscale* undoes it). The thread holds rows g (acc[.][0..1]) and g + 8
  // (acc[.][2..3]), columns 8j + 2*t4 + {0,1}.
  __device__ __forceinline__ void hand_over(float (&acc)[NT][4], uint32_t (&shi)[KT][4],
                                            uint32_t (&slo)[KT][4], float& unscale0,
                                            float& unscale1) const {
    const int g = c.lane >> 2, t4 = c.lane & 3;
    const float w0 = c.s_w[c.r0 + g], w1 = c.s_w[c.r0 + g + 8];
    float max0 = 0.0f, max1 = 0.0f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int lim = c.tb.lim[j];
      const int n = 8 * j + 2 * t4;
      acc[j][0] = n < lim ? acc[j][0] * w0 : 0.0f;
      acc[j][1] = n + 1 < lim ? acc[j][1] * w0 : 0.0f;
      acc[j][2] = n < lim ? acc[j][2] * w1 : 0.0f;
      acc[j][3] = n + 1 < lim ? acc[j][3] * w1 : 0.0f;
      max0 = fmaxf(max0, fmaxf(fabsf(acc[j][0]), fabsf(acc[j][1])));
      max1 = fmaxf(max1, fmaxf(fabsf(acc[j][2]), fabsf(acc[j][3])));
    }
    float scale0 = 1.0f, scale1 = 1.0f;
    unscale0 = unscale1 = 1.0f;
    if constexpr (std::is_same_v<T, __half>) {
      // Row maxima over the quad, then exact power-of-two scales to 2^14.
      max0 = fmaxf(max0, __shfl_xor_sync(0xffffffffu, max0, 1));
      max0 = fmaxf(max0, __shfl_xor_sync(0xffffffffu, max0, 2));
      max1 = fmaxf(max1, __shfl_xor_sync(0xffffffffu, max1, 1));
      max1 = fmaxf(max1, __shfl_xor_sync(0xffffffffu, max1, 2));
      const int e0 = static_cast<int>((__float_as_uint(max0) >> 23) & 0xffu) - 127;
      const int e1 = static_cast<int>((__float_as_uint(max1) >> 23) & 0xffu) - 127;
      const int sh0 = max(-100, min(100, 14 - e0)), sh1 = max(-100, min(100, 14 - e1));
      scale0 = pow2(sh0), unscale0 = pow2(-sh0);
      scale1 = pow2(sh1), unscale1 = pow2(-sh1);
    }
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      split2<T>(acc[2 * t][0] * scale0, acc[2 * t][1] * scale0, shi[t][0], slo[t][0]);
      split2<T>(acc[2 * t][2] * scale1, acc[2 * t][3] * scale1, shi[t][1], slo[t][1]);
      split2<T>(acc[2 * t + 1][0] * scale0, acc[2 * t + 1][1] * scale0, shi[t][2], slo[t][2]);
      split2<T>(acc[2 * t + 1][2] * scale1, acc[2 * t + 1][3] * scale1, shi[t][3], slo[t][3]);
    }
  }

  // One 64-column tile of slice `cur`: out = s @ B^T tile, added to the staged output tile in
  // place (rounded once) and written back.
  __device__ __forceinline__ void expand_tile(const SliceTiles<T>& cur,
                                              const uint32_t (&shi)[KT][4],
                                              const uint32_t (&slo)[KT][4], float unscale0,
                                              float unscale1, int step, int stage) const {
    if (!c.warp_active) return;
    const int lane = c.lane;
    const int kt0 = cur.kt0, nkt = cur.nb / 16;
    const uint32_t os = c.smem0 + stage * c.stage_bytes;
    const uint32_t bs = os + c.rows * kRowBytes;
    float out[kChunk / 8][4];
#pragma unroll
    for (int j = 0; j < kChunk / 8; ++j) out[j][0] = out[j][1] = out[j][2] = out[j][3] = 0.0f;
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      if (t < kt0 || t >= kt0 + nkt) continue;
      const int kr = (t - kt0) * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int jp = 0; jp < kChunk / 16; ++jp) {
        uint32_t bf[4];
        ldsm_x4_trans(bf, bs + swz(kr, 2 * jp + (lane >> 4)));
        mma16816<T>(out[2 * jp], shi[t], bf[0], bf[1]);
        mma16816<T>(out[2 * jp], slo[t], bf[0], bf[1]);
        mma16816<T>(out[2 * jp + 1], shi[t], bf[2], bf[3]);
        mma16816<T>(out[2 * jp + 1], slo[t], bf[2], bf[3]);
      }
    }
    // out += staged output tile, rounded once, in place in shared memory: ldmatrix hands each lane
    // exactly its accumulators' elements (matrix m = rows 8(m & 1).. of n tile 2jp + m / 2),
    // stmatrix puts them back.
#pragma unroll
    for (int jp = 0; jp < kChunk / 16; ++jp) {
      const uint32_t at = os + swz(c.r0 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * jp + (lane >> 4));
      uint32_t v[4];
      ldsm_x4(v, at);
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const float(&o)[4] = out[2 * jp + (m >> 1)];
        const int h = m & 1;
        const float u = h == 0 ? unscale0 : unscale1;
        const float2 was = unpack2<T>(v[m]);
        v[m] = pack2<T>(was.x + o[2 * h] * u, was.y + o[2 * h + 1] * u);
      }
      stsm_x4(at, v);
    }
    __syncwarp();
    // The warp's 16 rows back to global memory, 16 bytes per lane, 8 lanes per row.
    const int64_t col = cur.col0 + int64_t{step} * kChunk;
    if (col < cur.out_dim) {
      const int64_t at = cur.col_offset + col;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (c.orow[q] != nullptr) {
          *reinterpret_cast<uint4*>(c.orow[q] + at) =
              *reinterpret_cast<const uint4*>(c.smem + (os - c.smem0) + c.row_off[q]);
        }
      }
    }
  }

  // The hand-over, then the pass's slices tile by tile, the main loop's pipeline continued.
  __device__ __forceinline__ void epilogue(float (&acc)[NT][4]) const {
    uint32_t shi[KT][4], slo[KT][4];
    float unscale0, unscale1;
    hand_over(acc, shi, slo, unscale0, unscale1);
    for (int i = sb; i < se; ++i) {
      const SliceTiles<T> cur = slice_tiles(i);
      if (cur.first == cur.end) continue;  // uniform: no rank, or no tile for this part
      const auto load_tile = [this, &cur](int step, int stage) {
        if (step < cur.end) copy_tile(cur, step, stage);
        else copy_any_tile(step, stage);
      };
      const auto expand = [&](int step, int stage) {
        expand_tile(cur, shi, slo, unscale0, unscale1, step, stage);
      };
      pipeline_steps(cur.first, cur.end, nsteps, load_tile, expand);
    }
    pipeline_drain();
  }
};

// ---- the kernel ------------------------------------------------------------------------------

template <typename T, int N>
__global__ void __launch_bounds__(32 * kMaxWarps, kMinCtasPerSm<N>)
    lora_mma_kernel(const LoraArgs a, const MmaPlan plan, int64_t items, int32_t mtiles,
                    int32_t csplit) {
  // Dynamic: kStages stages, then the tile rows' and the adapter's tables
  // (dynamic_tables_bytes(rows, a)).
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ PassTables<T, N> tb;
  MmaCta<T, N> cta(a, tb, smem);
  // Memory only from here (common/launch.cuh); the next grid starts as these CTAs exit
  // (docs/performance.md, "PDL").
  wait_for_previous_grid();
  if (cta.tid == 0) {
#pragma unroll
    for (int i = 0; i < kMaxSlices; ++i) tb.base[i] = plan.base[i], tb.rp[i] = plan.rp[i];
#pragma unroll
    for (int i = 0; i <= kMaxSlices; ++i) tb.pass[i] = plan.pass_begin[i];
  }  // read after the first barrier below

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t cs = item % csplit;  // this CTA's part: its rank in the cluster
    const int64_t tile = item / csplit;
    const int64_t b = tile / mtiles;
    const int64_t m0 = (tile % mtiles) * cta.rows;
    // One round trip for the block count, the block's group and this thread's pair: the align
    // outputs hold every block an item can name (b < max_blocks), so all are read before the
    // count is compared.
    const int32_t num_blocks = *a.num_blocks;
    const int32_t slot = a.block_slot[b * a.block_slot_stride];
    const int32_t expert =
        a.block_expert != nullptr ? a.block_expert[b * a.block_expert_stride] : 0;
    int32_t pair = -1;
    if (cta.tid < cta.rows && m0 + cta.tid < a.block_m) {
      pair = a.sorted_pairs[(b * a.block_m + m0 + cta.tid) * a.pairs_stride];
    }
    if (b >= num_blocks) break;  // items are ordered by block
    const bool valid = cta.stage_item(slot, expert, pair);
    if (__syncthreads_or(valid)) {
      cta.take_rows();
      for (int p = 0; p < plan.num_passes; ++p) {
        MmaPass<T, N> pass(cta, tb.pass[p], tb.pass[p + 1], cs, csplit);
        if (!pass.prepare()) continue;  // uniform over the cluster
        float acc[MmaPass<T, N>::NT][4];
        pass.main_loop(acc);
        pass.epilogue(acc);
      }
    }
    __syncthreads();  // the row tables are rewritten by the next item
  }
}

template <typename T, int N>
void launch(const LoraArgs& a, const MmaPlan& mma_plan, int64_t max_blocks, int64_t launch_blocks,
            int64_t expected_blocks, const LoraPlan& plan, cudaStream_t stream) {
  const int warps = static_cast<int>(std::clamp<int64_t>((a.block_m + 15) / 16, 1, kMaxWarps));
  const int rows = 16 * warps;
  const int64_t mtiles = (a.block_m + rows - 1) / rows;
  // CTAs per (block, M tile): with few blocks (mixtral at 512 tokens: ~100 blocks, w13 with
  // 28672 output columns, w2 with a 14336-long K) one CTA per block leaves most SMs idle while
  // each streams a long shrink and expand; a cluster splits both.
  plan_rules::MmaSplitShape split_shape{};
  for (int i = 0; i < a.num_slices; ++i) {
    if (mma_plan.rp[i] == 0) continue;  // no slot has rank: expands nothing
    split_shape.widest_tiles =
        std::max(split_shape.widest_tiles, (a.slices[i].out_dim + kChunk - 1) / kChunk);
  }
  split_shape.k_chunks = (a.in_dim + kChunk - 1) / kChunk;
  split_shape.expected_items = expected_blocks * mtiles;
  split_shape.warps = warps;
  const int64_t csplit =
      plan_rules::mma_cluster_split(split_shape, plan, device_props(DeviceKind::kCUDA, -1));
  const int64_t items = max_blocks * mtiles * csplit;  // every item the outputs can hold
  // Sized for launch_blocks; a multiple of csplit, so that a cluster's CTAs walk the same items
  // grid-stride (up to the device-side block count: any grid is correct).
  const unsigned grid = static_cast<unsigned>(
      std::min<int64_t>(launch_blocks * mtiles * csplit, (int64_t{1} << 30) / csplit * csplit));
  const size_t smem = size_t{kStages} * (rows + N) * kRowBytes + dynamic_tables_bytes(rows, a);
  // Always opt in: the default limit on dynamic shared memory is 48 KB minus the kernel's
  // static shared memory (~2.6 KB of row tables), so 48 KB of stages (N = 64, 64 rows) already
  // needs it. Cheap host call; also legal during stream capture.
  detail::allow_dynamic_smem(lora_mma_kernel<T, N>, static_cast<size_t>(smem));
  launch_kernel(lora_mma_kernel<T, N>,
                LaunchShape{dim3(grid), dim3(32 * warps), smem, stream, static_cast<int>(csplit),
                            plan.pdl},
                a, mma_plan, items, static_cast<int32_t>(mtiles), static_cast<int32_t>(csplit));
  detail::check_launch("fused_moe_lora mma");
}

template <typename T>
void launch_bucket(const LoraArgs& a, const MmaPlan& mma_plan, int widest, int64_t max_blocks,
                   int64_t launch_blocks, int64_t expected_blocks, const LoraPlan& plan,
                   cudaStream_t stream) {
  if (widest <= 32) {
    launch<T, 32>(a, mma_plan, max_blocks, launch_blocks, expected_blocks, plan, stream);
  } else if (widest <= 64) {
    launch<T, 64>(a, mma_plan, max_blocks, launch_blocks, expected_blocks, plan, stream);
  } else {
    launch<T, 128>(a, mma_plan, max_blocks, launch_blocks, expected_blocks, plan, stream);
  }
}

}  // namespace

bool launch_lora_mma(const LoraArgs& a, DType dtype, LoraVectorization vec, int64_t max_blocks,
                     int64_t launch_blocks, int64_t expected_blocks, const LoraPlan& plan,
                     cudaStream_t stream) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return false;
  if (!vec.input || !vec.output || a.sorted_pairs == nullptr) return false;
  if (a.num_slices <= 0 || a.num_slices > kMaxSlices || a.block_m <= 0 || max_blocks <= 0) {
    return false;
  }
  if (a.in_dim > (int64_t{1} << 30) || a.input_pairs_per_row <= 0) return false;
  // Passes: consecutive slices whose padded ranks fit in kMaxN columns together.
  MmaPlan mma_plan{};
  int open = 0, widest = 0;
  for (int i = 0; i < a.num_slices; ++i) {
    const SliceArgs& s = a.slices[i];
    int rp = 0;
    if (s.num_slots > 0 && s.max_rank > 0) {
      if (s.max_rank > kMaxRank || !detail::aligned16(s.arena)) return false;
      if (s.out_dim > (int64_t{1} << 30)) return false;
      rp = (s.max_rank + 15) / 16 * 16;
    }
    if (open + rp > kMaxN) {
      mma_plan.pass_begin[++mma_plan.num_passes] = i;
      open = 0;
    }
    mma_plan.base[i] = open;
    mma_plan.rp[i] = rp;
    open += rp;
    widest = std::max(widest, open);
  }
  mma_plan.pass_begin[++mma_plan.num_passes] = a.num_slices;
  if (widest == 0) return true;  // no slot has a rank anywhere: nothing to add
  launch_blocks = std::clamp<int64_t>(launch_blocks, 1, max_blocks);
  expected_blocks = std::clamp<int64_t>(expected_blocks, 1, launch_blocks);
  if (dtype == DType::kFloat16) {
    launch_bucket<__half>(a, mma_plan, widest, max_blocks, launch_blocks, expected_blocks, plan,
                          stream);
  } else {
    launch_bucket<__nv_bfloat16>(a, mma_plan, widest, max_blocks, launch_blocks, expected_blocks,
                                 plan, stream);
  }
  return true;
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
