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
// Declines (returns false) for float32, unaligned rows, max_rank > 64 or an unaligned arena.
// Assumes each adapter row is 16-byte aligned in its arena (the row layout guarantees it).
// Template space: dtype x N = 6 kernels.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "common/cluster.cuh"
#include "common/common.cuh"
#include "lora/kernels.h"
#include "common/ptx.cuh"

namespace moelora::cuda {

namespace {

using namespace ptx;  // NOLINT: the PTX wrappers read best unqualified here

constexpr int kMaxWarps = 4;
constexpr int kMaxN = 128;                // columns of a pass (summed, padded ranks)
constexpr int kMaxRank = 64;
constexpr int kChunk = 64;   // K chunk of the shrink and column tile of the expand (elements)
constexpr int kRowBytes = kChunk * 2;  // one 128-byte shared-memory row of a stage
// Stages of the cp.async pipeline: 4, 1.7% faster than 3 over the prefill grid (22 of 24 cases;
// at N = 32 still 4 CTAs per SM, 48 KB each); -DMOELORA_MMA_STAGES=<n> in CMAKE_CUDA_FLAGS builds
// another depth.
// Registers: sized so that they never bound residency below what the stages' shared memory
// allows with 4 warps (4 CTAs per SM at N = 32, 3 at 64, 2 at 128): __launch_bounds__' second
// argument. v3g needs it at N = 32, where ptxas otherwise takes 144-148 registers (3 CTAs per
// SM); 128 fit without spills. -DMOELORA_MMA_MIN_CTAS=<n> overrides it for every N (session 5:
// 5, i.e. 96 registers with spills at N >= 64, was 0.997x over the prefill grid; bench/NOTES.md
// "v3d: pipeline depth and registers", tools/gpu_stages_sweep.sh).
#ifndef MOELORA_MMA_STAGES
#define MOELORA_MMA_STAGES 4
#endif
#ifdef MOELORA_MMA_MIN_CTAS
#define MOELORA_MMA_LAUNCH_BOUNDS(N) __launch_bounds__(32 * kMaxWarps, MOELORA_MMA_MIN_CTAS)
#else
#define MOELORA_MMA_LAUNCH_BOUNDS(N) \
  __launch_bounds__(32 * kMaxWarps, (N) <= 32 ? 4 : (N) <= 64 ? 3 : 2)
#endif
constexpr int kStages = MOELORA_MMA_STAGES;
static_assert(kStages >= 2, "the pipeline needs at least two stages");
// Cluster split (launch): CTAs per SM it aims for by CTA width (1..4 warps), the splits it
// picks from, its cap (the portable cluster size), and the fewest 64-element K chunks / 64-column
// tiles a part keeps. Fitted on the H200 (bench/NOTES.md, v3d; tools/fit_mma_split.py): 4-warp
// CTAs ~one wave of resident CTAs (4 per SM at 118 registers), 1-warp CTAs ~8 per SM (2-3 warps
// interpolated, not measured); a cluster of 4 was slower than one of 3 in 24 of 32 grid cases,
// so 4, 5 and 7 are never picked.
constexpr double kTargetCtasPerSm[] = {0.0, 8.0, 6.0, 5.0, 4.0};
constexpr int64_t kSplitChoices[] = {1, 2, 3, 6, 8};
constexpr int64_t kMaxSplit = 8;
constexpr int64_t kMinTilesPerPart = 4;

// Slices grouped into passes (consecutive slices), built on the host.
struct MmaPlan {
  int32_t num_passes;
  int32_t pass_begin[kMaxSlices + 1];
  int32_t base[kMaxSlices];  // first column of slice i in its pass (multiple of 16)
  int32_t rp[kMaxSlices];    // columns of slice i: max_rank rounded up to 16 (0: no slots)
};

// ---- shared-memory tiles and pair helpers -----------------------------------------------------

// Byte offset of 16-byte chunk `ch` (0..7) of row `row` in a tile of 128-byte rows.
__device__ __forceinline__ uint32_t swz(int row, int ch) {
  return static_cast<uint32_t>(row * kRowBytes + ((ch ^ (row & 7)) << 4));
}

// hi = T(x), lo = T(x - hi), per element of the pair.
template <typename T>
__device__ __forceinline__ void split2(float x, float y, uint32_t& hi, uint32_t& lo) {
  hi = pack2<T>(x, y);
  const float2 h = unpack2<T>(hi);
  lo = pack2<T>(x - h.x, y - h.y);
}

// 2^e as a float, e clamped to the normal range.
__device__ __forceinline__ float pow2(int e) {
  e = max(-126, min(127, e));
  return __uint_as_float(static_cast<uint32_t>(e + 127) << 23);
}

// A kStages-deep cp.async pipeline over steps 0..n-1: load(step, stage) issues the copies of a
// step, compute(step, stage) consumes them; loads run kStages - 1 steps ahead. A pass runs its
// shrink and its expands as ONE pipeline (pipeline_fill once, pipeline_steps for the shrink's
// steps, the hand-over in registers, pipeline_steps for the expand's), so the first expand
// tiles are in flight while the last K chunks are multiplied; v3f drained and refilled the
// stages between the phases and between slices (one memory latency each).
template <typename Load>
__device__ __forceinline__ void pipeline_fill(int first, int n, Load&& load) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (first + s < n) load(first + s, (first + s) % kStages);
    cp_async_commit();
  }
}

// Steps [begin, end) of a pipeline of n steps, filled from `begin` or continuing one that ran
// up to begin: one commit group per step, so waiting for all but kStages - 2 groups lands step
// `it`; one barrier per step, after which stage (it - 1) % kStages is free for a new load.
template <typename Load, typename Compute>
__device__ __forceinline__ void pipeline_steps(int begin, int end, int n, Load&& load,
                                               Compute&& compute) {
  for (int it = begin; it < end; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = it + kStages - 1;
    if (next < n) load(next, next % kStages);
    cp_async_commit();
    compute(it, it % kStages);
  }
}

// Waits for every copy and every thread: the stages may then be reused for something else.
__device__ __forceinline__ void pipeline_drain() {
  cp_async_wait<0>();
  __syncthreads();
}

// Dynamic shared memory after the stages: per tile row, its input and output row pointers and
// its routing weight (sized by the CTA's rows, so 1-warp CTAs keep 8 per SM at N = 32); then
// the item's adapter row tables, every slice's whole entry of (slot, expert) as byte offsets,
// [slice][A, B][rank_stride].
__host__ __device__ constexpr size_t row_tables_bytes(int rows) {
  return static_cast<size_t>(rows) * (2 * sizeof(void*) + sizeof(float));
}
__host__ __device__ inline size_t dynamic_tables_bytes(int rows, const LoraArgs& a) {
  return row_tables_bytes(rows) + sizeof(int64_t) * a.num_slices * 2 * a.rank_stride;
}

// 64-column tiles [begin, end) of a slice that column part cs of csplit expands: contiguous
// shares that cover the slice's tiles exactly once over the parts.
struct TileRange {
  int64_t begin, end;
};
__device__ __forceinline__ TileRange part_tiles(int64_t out_dim, int64_t cs, int64_t csplit) {
  const int64_t nt = (out_dim + kChunk - 1) / kChunk;
  return TileRange{nt * cs / csplit, nt * (cs + 1) / csplit};
}

// acc += the same thread's acc in every other CTA of the cluster, in rank order (so repeated
// runs are bit-identical), through `scratch` (the stage memory: pipeline_drain() left it free).
template <int NT>
__device__ __forceinline__ void cluster_sum(float (&acc)[NT][4], float* scratch) {
  const Cluster cluster;
  const int tid = static_cast<int>(threadIdx.x);
  const int nthreads = static_cast<int>(blockDim.x);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int q = 0; q < 4; ++q) scratch[(j * 4 + q) * nthreads + tid] = acc[j][q];
  }
  cluster.sync();  // every partial is written
  for (int r = 0; r < cluster.size(); ++r) {
    const float* part = cluster.peer(scratch, r);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float v = part[(j * 4 + q) * nthreads + tid];
        acc[j][q] = r == 0 ? v : acc[j][q] + v;
      }
    }
  }
  cluster.sync();  // no peer still reads this CTA's scratch when the expand reuses it
}

// ---- the kernel ------------------------------------------------------------------------------

template <typename T, int N>
__global__ void MOELORA_MMA_LAUNCH_BOUNDS(N)
    lora_mma_kernel(const LoraArgs a, const MmaPlan plan, int64_t items, int32_t mtiles,
                    int32_t csplit) {
  constexpr int NT = N / 8;   // n8 tiles of a pass (shrink)
  constexpr int KT = N / 16;  // k16 tiles of a pass (expand)
  // Dynamic: kStages stages, then the tile rows' and the adapter's tables
  // (dynamic_tables_bytes(rows, a)).
  extern __shared__ __align__(128) unsigned char smem[];
  // A rows of the pass in load order (null: zero-fill) and their rows in the stage.
  __shared__ const T* s_wsrc[kMaxN];
  __shared__ uint8_t s_wdst[kMaxN];
  // B^T row k of slice i at s_base[i] + k (null past the rank: zeros), for every slice of the
  // pass at once: the expand tiles are loaded while the shrink still runs.
  __shared__ const T* s_bsrc[kMaxN];
  __shared__ int32_t s_lim[NT];          // per n tile: end of the valid columns (base + rank)
  __shared__ int32_t s_rank[kMaxSlices];
  // Expand steps of the pass: slice i owns steps [s_first[i], s_first[i + 1]) (none when it has
  // no rank or this part no tile of it), its tile 0 being column tile s_tile0[i] of the slice.
  __shared__ int32_t s_first[kMaxSlices + 1], s_tile0[kMaxSlices];
  __shared__ int32_t s_base[kMaxSlices], s_rp[kMaxSlices], s_pass[kMaxSlices + 1];  // the plan

  const int tid = static_cast<int>(threadIdx.x);
  const int nthreads = static_cast<int>(blockDim.x);
  const int lane = tid & 31;
  const int r0 = (tid >> 5) * 16;  // this warp's first tile row
  const int g = lane >> 2, t4 = lane & 3;
  const int rows = nthreads / 2;  // 16 rows per warp
  const uint32_t stage_bytes = static_cast<uint32_t>((rows + N) * kRowBytes);
  // Per tile row: its input row and output row (null = padding) and routing weight.
  const T** const s_xrow = reinterpret_cast<const T**>(smem + kStages * stage_bytes);
  T** const s_orow = reinterpret_cast<T**>(smem + kStages * stage_bytes + rows * sizeof(T*));
  float* const s_w = reinterpret_cast<float*>(s_orow + rows);
  int64_t* const s_table = reinterpret_cast<int64_t*>(
      smem + kStages * stage_bytes + row_tables_bytes(rows));
  // The rank of slice i (the raw value travels by cp.async; clamped where it is read).
  const auto rank_of = [&](int i) { return max(0, min(s_rank[i], a.slices[i].max_rank)); };
  // Adapter row k of slice i (A or B^T) from the staged table.
  const auto adapter_row = [&](int i, bool is_b, int k) {
    return reinterpret_cast<const T*>(a.slices[i].arena +
                                      s_table[(i * 2 + (is_b ? 1 : 0)) * a.rank_stride + k]);
  };
  // Copies: a thread moves 16-byte chunk `ch` of its rows. The x and output tiles are
  // warp-local: lane l copies rows r0 + l / 8 + 4q (q < 4) of its own warp, so an idle warp
  // copies nothing and each lane's row pointers and stage offsets are set once, outside the
  // pipelines (the address math per copy was most of the kernel's instructions: bench/NOTES.md,
  // v3f). The adapter tiles are shared by the CTA: thread t copies rows t / 8 + k * nthreads / 8.
  const int ch = lane & 7;
  uint32_t row_off[4];  // offsets of this lane's 4 rows (chunk ch) in a swizzled tile
#pragma unroll
  for (int q = 0; q < 4; ++q) row_off[q] = swz(r0 + (lane >> 3) + 4 * q, ch);
  const uint32_t smem0 = smem_u32(smem);
  const T* input = static_cast<const T*>(a.input);
  T* output = static_cast<T*>(a.output);
  wait_for_previous_grid();  // memory only from here (common/launch.cuh); the next grid starts as
                             // these CTAs exit (an early release slowed 1-wave steps: NOTES)
  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < kMaxSlices; ++i) s_base[i] = plan.base[i], s_rp[i] = plan.rp[i];
#pragma unroll
    for (int i = 0; i <= kMaxSlices; ++i) s_pass[i] = plan.pass_begin[i];
  }  // read after the first barrier below

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t cs = item % csplit;  // this CTA's part: its rank in the cluster
    const int64_t tile = item / csplit;
    const int64_t b = tile / mtiles;
    const int64_t m0 = (tile % mtiles) * rows;
    // One round trip for the block count, the block's group and this thread's pair: the align
    // outputs hold every block an item can name (b < max_blocks), so all are read before the
    // count is compared.
    const int32_t num_blocks = *a.num_blocks;
    const int32_t slot = a.block_slot[b * a.block_slot_stride];
    const int32_t expert =
        a.block_expert != nullptr ? a.block_expert[b * a.block_expert_stride] : 0;
    int32_t pair = -1;
    if (tid < rows && m0 + tid < a.block_m) {
      pair = a.sorted_pairs[(b * a.block_m + m0 + tid) * a.pairs_stride];
    }
    if (b >= num_blocks) break;  // items are ordered by block
    // Second round trip, all as cp.async copies so that none waits for another: each slice's
    // rank and its whole row-table entry (not waiting for the rank: v3h read the tables after
    // the ranks had landed, one more trip), and the rows' routing weights.
    for (int i = 0; i < a.num_slices; ++i) {
      const SliceArgs& s = a.slices[i];
      const bool known = slot >= 0 && slot < s.num_slots && expert >= 0 && expert < s.num_experts;
      if (tid == nthreads - 1 - i) {  // the last warp: the first ones copy the rows below
        if (known) {
          cp_async4(smem_u32(s_rank + i), s.ranks + slot * s.rank_slot_stride);
        } else {
          s_rank[i] = 0;
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
    if (__syncthreads_or(valid)) {
      const bool warp_active = __any_sync(0xffffffffu, lane < 16 && s_xrow[r0 + lane] != nullptr);
      const T* xrow[4];  // this lane's input rows (null: padding, zero-filled)
      T* orow[4];        // this lane's output rows (null: padding, never touched)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        xrow[q] = s_xrow[r0 + (lane >> 3) + 4 * q];
        orow[q] = s_orow[r0 + (lane >> 3) + 4 * q];
      }
      for (int p = 0; p < plan.num_passes; ++p) {
        const int sb = s_pass[p], se = s_pass[p + 1];  // pass p is slices [sb, se)
        // Rows of A to load: the first roundup(rank, 8) of each slice's columns.
        int nact = 0;
        uint32_t tile_mask = 0;
        for (int i = sb; i < se; ++i) {
          const int c = (rank_of(i) + 7) / 8;
          tile_mask |= ((1u << c) - 1u) << (s_base[i] / 8);
          nact += 8 * c;
        }
        if (nact == 0) continue;  // uniform over the cluster: no slice of this pass has rank
        // The pass's A and B^T row addresses, from the staged tables (no memory trip here).
        for (int idx = tid; idx < nact; idx += nthreads) {
          int i = sb, k = idx;
          while (k >= 8 * ((rank_of(i) + 7) / 8)) k -= 8 * ((rank_of(i) + 7) / 8), ++i;
          s_wdst[idx] = static_cast<uint8_t>(s_base[i] + k);
          s_wsrc[idx] = k < rank_of(i) ? adapter_row(i, false, k) : nullptr;
        }
        for (int e = tid; e < N; e += nthreads) {
          const T* src = nullptr;
          for (int i = sb; i < se; ++i) {
            const int k = e - s_base[i];
            if (k >= 0 && k < rank_of(i)) src = adapter_row(i, true, k);
          }
          s_bsrc[e] = src;
        }
        for (int j = tid; j < NT; j += nthreads) {
          int lim = 0;
          for (int i = sb; i < se; ++i) {
            if (8 * j >= s_base[i] && 8 * j < s_base[i] + s_rp[i]) {
              lim = s_base[i] + rank_of(i);
            }
          }
          s_lim[j] = lim;
        }
        // This CTA's share of the K chunks (all of them without a cluster): the shrink steps.
        const int64_t in_dim = a.in_dim;
        const int64_t chunks = (in_dim + kChunk - 1) / kChunk;
        const int64_t chunk0 = chunks * cs / csplit;
        const int nsh = static_cast<int>(chunks * (cs + 1) / csplit - chunk0);
        if (tid == 0) {
          int step = nsh;
          for (int i = sb; i < se; ++i) {
            s_first[i] = step;
            if (rank_of(i) == 0) continue;
            const TileRange tr = part_tiles(a.slices[i].out_dim, cs, csplit);
            s_tile0[i] = static_cast<int32_t>(tr.begin);
            step += static_cast<int>(tr.end - tr.begin);
          }
          s_first[se] = step;
        }
        __syncthreads();
        const int nsteps = s_first[se];

        // ---- shrink: acc[j] = x_tile (16 rows of this warp) @ A_pass^T, n tile j ----
        float acc[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        auto load_chunk = [&](int c, int stage) {
          const int64_t d = (chunk0 + c) * kChunk + ch * 8;
          const bool in = d < in_dim;  // the in_dim tail is zero-filled
          const uint32_t xs = smem0 + stage * stage_bytes;
          const uint32_t ws = xs + rows * kRowBytes;
          if (warp_active) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const bool ok = xrow[q] != nullptr && in;
              cp_async16(xs + row_off[q], ok ? xrow[q] + d : input, ok);
            }
          }
          for (int j = tid >> 3; j < nact; j += nthreads >> 3) {
            const T* src = s_wsrc[j];
            const bool ok = src != nullptr && in;
            cp_async16(ws + swz(s_wdst[j], ch), ok ? src + d : input, ok);
          }
        };
        // Expand step -> slice (steps of slices without tiles are empty ranges).
        auto step_slice = [&](int step) {
          int i = sb;
          while (step >= s_first[i + 1]) ++i;
          return i;
        };
        // What the expand of slice i needs, read once per slice (not per step: per-step lookups
        // cost more than the drains they replaced, bench/NOTES.md v3g): its steps
        // [first, end), this lane's column at step 0 (column of step = col0 + step * kChunk),
        // its B^T rows and k tiles, its output width and column offset.
        struct SliceTiles {
          int first, end, nb, kt0;
          int64_t col0, out_dim, col_offset;
          const T* const* bsrc;
        };
        auto slice_tiles = [&](int i) {
          SliceTiles st;
          st.first = s_first[i];
          st.end = s_first[i + 1];
          st.nb = 16 * ((rank_of(i) + 15) / 16);  // B^T rows: the k tiles holding ranks
          st.kt0 = s_base[i] / 16;                // first k tile of the slice in the pass
          st.col0 = (int64_t{s_tile0[i]} - st.first) * kChunk + ch * 8;
          st.out_dim = a.slices[i].out_dim;
          st.col_offset = a.slices[i].col_offset;
          st.bsrc = s_bsrc + s_base[i];
          return st;
        };
        auto copy_tile = [&](const SliceTiles& st, int step, int stage) {
          const int64_t col = st.col0 + int64_t{step} * kChunk;
          const bool in = col < st.out_dim;  // columns past out_dim: never read nor written
          const uint32_t os = smem0 + stage * stage_bytes;
          const uint32_t bs = os + rows * kRowBytes;
          for (int k = tid >> 3; k < st.nb; k += nthreads >> 3) {
            const T* src = st.bsrc[k];
            const bool ok = src != nullptr && in;
            cp_async16(bs + swz(k, ch), ok ? src + col : input, ok);
          }
          if (warp_active && in) {
            const int64_t at = st.col_offset + col;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              if (orow[q] != nullptr) cp_async16(os + row_off[q], orow[q] + at, true);
            }
          }
        };
        // A tile of any slice, found by its step: the loads that run ahead into a later slice.
        auto copy_any_tile = [&](int step, int stage) {
          copy_tile(slice_tiles(step_slice(step)), step, stage);
        };
        auto load_step = [&](int step, int stage) {
          if (step < nsh) load_chunk(step, stage);
          else copy_any_tile(step, stage);
        };
        auto shrink_chunk = [&](int, int stage) {
          if (!warp_active) return;
          const uint32_t xs = smem0 + stage * stage_bytes;
          const uint32_t ws = xs + rows * kRowBytes;
#pragma unroll
          for (int ks = 0; ks < kChunk / 16; ++ks) {
            uint32_t af[4];
            ldsm_x4(af, xs + swz(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * ks + (lane >> 4)));
#pragma unroll
            for (int jp = 0; jp < NT / 2; ++jp) {
              const uint32_t pm = (tile_mask >> (2 * jp)) & 3u;
              if (pm == 0) continue;  // tile 2jp+1 active implies tile 2jp active
              uint32_t bf[4];
              ldsm_x4(bf, ws + swz(16 * jp + (lane & 7) + (lane >> 4) * 8,
                                   2 * ks + ((lane >> 3) & 1)));
              mma16816<T>(acc[2 * jp], af, bf[0], bf[1]);
              if (pm & 2u) mma16816<T>(acc[2 * jp + 1], af, bf[2], bf[3]);
            }
          }
        };
        if (csplit == 1) {
          // One pipeline: the loads run on into the expand's first tiles.
          pipeline_fill(0, nsteps, load_step);
          pipeline_steps(0, nsh, nsteps, load_step, shrink_chunk);
        } else {
          // The partial sums meet in the stage memory: drain, sum, then start the expand.
          pipeline_fill(0, nsh, load_chunk);
          pipeline_steps(0, nsh, nsh, load_chunk, shrink_chunk);
          pipeline_drain();
          cluster_sum(acc, reinterpret_cast<float*>(smem));
          pipeline_fill(nsh, nsteps, copy_any_tile);
        }

        // ---- hand-over: s = w * acc (zero past the rank) as hi/lo A fragments ----
        // Thread holds rows g (acc[.][0..1]) and g + 8 (acc[.][2..3]), columns 8j + 2*t4 + {0,1}.
        const float w0 = s_w[r0 + g], w1 = s_w[r0 + g + 8];
        float max0 = 0.0f, max1 = 0.0f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int lim = s_lim[j];
          const int n = 8 * j + 2 * t4;
          acc[j][0] = n < lim ? acc[j][0] * w0 : 0.0f;
          acc[j][1] = n + 1 < lim ? acc[j][1] * w0 : 0.0f;
          acc[j][2] = n < lim ? acc[j][2] * w1 : 0.0f;
          acc[j][3] = n + 1 < lim ? acc[j][3] * w1 : 0.0f;
          max0 = fmaxf(max0, fmaxf(fabsf(acc[j][0]), fabsf(acc[j][1])));
          max1 = fmaxf(max1, fmaxf(fabsf(acc[j][2]), fabsf(acc[j][3])));
        }
        float scale0 = 1.0f, scale1 = 1.0f, unscale0 = 1.0f, unscale1 = 1.0f;
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
        uint32_t shi[KT][4], slo[KT][4];
#pragma unroll
        for (int t = 0; t < KT; ++t) {
          split2<T>(acc[2 * t][0] * scale0, acc[2 * t][1] * scale0, shi[t][0], slo[t][0]);
          split2<T>(acc[2 * t][2] * scale1, acc[2 * t][3] * scale1, shi[t][1], slo[t][1]);
          split2<T>(acc[2 * t + 1][0] * scale0, acc[2 * t + 1][1] * scale0, shi[t][2], slo[t][2]);
          split2<T>(acc[2 * t + 1][2] * scale1, acc[2 * t + 1][3] * scale1, shi[t][3], slo[t][3]);
        }

        // ---- expand: the pass's slices, tile by tile, one pipeline continued ----
        for (int i = sb; i < se; ++i) {
          const SliceTiles cur = slice_tiles(i);
          if (cur.first == cur.end) continue;  // uniform: no rank, or no tile for this part
          const int kt0 = cur.kt0, nkt = cur.nb / 16;
          auto load_tile = [&](int step, int stage) {
            if (step < cur.end) copy_tile(cur, step, stage);
            else copy_any_tile(step, stage);
          };
          auto expand_tile = [&](int step, int stage) {
            if (!warp_active) return;
            const uint32_t os = smem0 + stage * stage_bytes;
            const uint32_t bs = os + rows * kRowBytes;
            float out[kChunk / 8][4];
#pragma unroll
            for (int j = 0; j < kChunk / 8; ++j) {
              out[j][0] = out[j][1] = out[j][2] = out[j][3] = 0.0f;
            }
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
            // out += staged output tile, rounded once, in place in shared memory: ldmatrix
            // hands each lane exactly its accumulators' elements (matrix m = rows 8(m & 1).. of
            // n tile 2jp + m / 2), stmatrix puts them back.
#pragma unroll
            for (int jp = 0; jp < kChunk / 16; ++jp) {
              const uint32_t at = os + swz(r0 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                           2 * jp + (lane >> 4));
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
                if (orow[q] != nullptr) {
                  *reinterpret_cast<uint4*>(orow[q] + at) =
                      *reinterpret_cast<const uint4*>(smem + (os - smem0) + row_off[q]);
                }
              }
            }
          };
          pipeline_steps(cur.first, cur.end, nsteps, load_tile, expand_tile);
        }
        pipeline_drain();
      }
    }
    __syncthreads();  // the row tables are rewritten by the next item
  }
}

// MOELORA_MMA_SPLIT=<n in 1..8> forces the cluster split (tests reach it on small problems);
// unset: 0, the heuristic decides; not an integer in 1..8: InvalidArgument. Read once.
int64_t forced_split() {
  static const int64_t forced = detail::env_int("MOELORA_MMA_SPLIT", 1, kMaxSplit);
  return forced;
}

// CTAs per (block, M tile). With few blocks (mixtral at 512 tokens: ~100 blocks, w13 with 28672
// output columns, w2 with a 14336-long K) one CTA per block leaves most SMs idle while each
// streams a long shrink and expand; a cluster splits both. `expected_items` are the (block,
// M tile) items expected to hold rows: the split that brings them nearest the target CTA count,
// from kSplitChoices, keeping kMinTilesPerPart K chunks and column tiles a part. Clusters exist
// from sm_90 on.
int64_t cluster_split(const LoraArgs& a, const MmaPlan& plan, int64_t expected_items, int warps) {
  if (detail::compute_capability_major() < 9) return 1;
  if (const int64_t forced = forced_split()) return forced;
  int64_t widest_tiles = 0;
  for (int i = 0; i < a.num_slices; ++i) {
    if (plan.rp[i] == 0) continue;  // no slot has rank: expands nothing
    widest_tiles = std::max(widest_tiles, (a.slices[i].out_dim + kChunk - 1) / kChunk);
  }
  const int64_t chunks = (a.in_dim + kChunk - 1) / kChunk;
  const int64_t cap = std::clamp<int64_t>(std::min(widest_tiles, chunks) / kMinTilesPerPart, 1,
                                          kMaxSplit);
  const double wanted = kTargetCtasPerSm[std::clamp(warps, 1, kMaxWarps)] * detail::sm_count() /
                        static_cast<double>(std::max<int64_t>(expected_items, 1));
  // The nearest choice within the cap by ratio (a split of 1 for 2 costs what 3 for 6 does:
  // v3f's refit, 1.015x the best forced split vs 1.020x by difference); ties: the smaller.
  const auto distance = [wanted](int64_t choice) {
    return std::abs(std::log(static_cast<double>(choice) / wanted));
  };
  int64_t split = 1;
  for (const int64_t choice : kSplitChoices) {
    if (choice <= cap && distance(choice) < distance(split)) split = choice;
  }
  return split;
}

template <typename T, int N>
void launch(const LoraArgs& a, const MmaPlan& plan, int64_t max_blocks, int64_t launch_blocks,
            int64_t expected_blocks, cudaStream_t stream) {
  const int warps = static_cast<int>(std::clamp<int64_t>((a.block_m + 15) / 16, 1, kMaxWarps));
  const int rows = 16 * warps;
  const int64_t mtiles = (a.block_m + rows - 1) / rows;
  const int64_t csplit = cluster_split(a, plan, expected_blocks * mtiles, warps);
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
                            /*after_previous_grid=*/true},
                a, plan, items, static_cast<int32_t>(mtiles), static_cast<int32_t>(csplit));
  detail::check_launch("fused_moe_lora mma");
}

template <typename T>
void launch_bucket(const LoraArgs& a, const MmaPlan& plan, int widest, int64_t max_blocks,
                   int64_t launch_blocks, int64_t expected_blocks, cudaStream_t stream) {
  if (widest <= 32) launch<T, 32>(a, plan, max_blocks, launch_blocks, expected_blocks, stream);
  else if (widest <= 64) launch<T, 64>(a, plan, max_blocks, launch_blocks, expected_blocks, stream);
  else launch<T, 128>(a, plan, max_blocks, launch_blocks, expected_blocks, stream);
}

}  // namespace

bool launch_lora_mma(const LoraArgs& a, DType dtype, LoraVectorization vec, int64_t max_blocks,
                     int64_t launch_blocks, int64_t expected_blocks, cudaStream_t stream) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return false;
  if (!vec.input || !vec.output || a.sorted_pairs == nullptr) return false;
  if (a.num_slices <= 0 || a.num_slices > kMaxSlices || a.block_m <= 0 || max_blocks <= 0) {
    return false;
  }
  if (a.in_dim > (int64_t{1} << 30) || a.input_pairs_per_row <= 0) return false;
  // Passes: consecutive slices whose padded ranks fit in kMaxN columns together.
  MmaPlan plan{};
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
      plan.pass_begin[++plan.num_passes] = i;
      open = 0;
    }
    plan.base[i] = open;
    plan.rp[i] = rp;
    open += rp;
    widest = std::max(widest, open);
  }
  plan.pass_begin[++plan.num_passes] = a.num_slices;
  if (widest == 0) return true;  // no slot has a rank anywhere: nothing to add
  launch_blocks = std::clamp<int64_t>(launch_blocks, 1, max_blocks);
  expected_blocks = std::clamp<int64_t>(expected_blocks, 1, launch_blocks);
  if (dtype == DType::kFloat16) {
    launch_bucket<__half>(a, plan, widest, max_blocks, launch_blocks, expected_blocks, stream);
  } else {
    launch_bucket<__nv_bfloat16>(a, plan, widest, max_blocks, launch_blocks, expected_blocks,
                                 stream);
  }
  return true;
}

}  // namespace moelora::cuda
