// The decode kernel of fused_moe_lora / dense_lora / fused_moe_lora_unsorted: one thread-block
// cluster per (work item, column group), shrink and expand in ONE launch, Split-K through
// distributed shared memory, no workspace, no atomics. A work item is a block of pairs sharing
// (slot, expert), or a single pair in the unsorted form.
//
// Why this shape: at decode every (slot, expert) group holds about one row, so a launch costs its
// chain of dependent DRAM round trips (~1 us each with a cold L2), not its bytes. Three are on
// the critical path, each issued as a batch of independent loads:
//   trip 1: the item's slot, expert and pair ids (the slot and the expert from two warps);
//   trip 2: ranks, the full row table (all max_rank entries, so it need not wait for the rank),
//           the rows' routing weights and the x rows, all cp.async into shared memory;
//   trip 3: A rows (loaded directly, several 16-byte loads in flight per lane) while the FIRST
//           expand stage (this CTA's B^T rows and output rows) is already on its way through
//           cp.async; later stages are double-buffered behind the compute.
// Per item and column group:
//   1. each CTA of the cluster takes 1/C of in_dim: warps reduce A rows against the staged x
//      rows into this CTA's partial s_part[MT][sum of ranks];
//   2. cluster.sync(); each CTA sums the C partials (DSMEM reads, fixed order, so repeated runs
//      are bit-identical), applies the routing weight, keeps s_full; it then arrives at the
//      cluster barrier and waits only before its partial is next overwritten (or it exits), so
//      no partial changes while a peer still reads it and the wait overlaps the expand;
//   3. the cluster's column group is cut in C parts; a CTA expands its part stage by stage from
//      shared memory (one thread per vector of columns, ranks in ascending order, one rounding
//      per output element, one owner per element).
// Column groups (G clusters per item, each redoing the small shrink through L2) exist so that a
// few wide items (mixtral at 1 token: 2 pairs x 28672 columns) still spread their B^T rows over
// ~2 waves of CTAs, each with one stage of bytes in flight at once.
// C (<= 16; above 8 non-portable) and G (<= 16) come from plan_rules::decode_shape on the host;
// with many items C = G = 1 and the kernel is a plain one-CTA-per-item kernel. Items are walked
// grid-stride (uniform per cluster). Measurements: docs/performance.md, "Decode kernel".
// Template space: T in {float, half, bf16} x MT in {1 (unsorted), 4 (grouped)} x VEC in {16-byte
// vectors, scalars (rows or column ranges not 16-byte aligned)}.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "common/cluster.cuh"
#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "common/ptx.cuh"
#include "lora/kernels.h"
#include "lora/trace.cuh"
#include "plan_rules.h"

namespace moelora::cuda {

namespace {

using ptx::cp_async4;
using ptx::cp_async8;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::smem_u32;
using detail::kVecBytes;
using detail::raw_to_f32;
using detail::RawVec;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarpStep = 4;     // A rows a warp streams together
// 16-byte loads per A row a lane issues before using any (fewer with 4 x rows: registers)
template <int MT>
constexpr int kStepsInFlight = MT == 1 ? 2 : 1;
// Three CTAs per SM (<= 80 registers a thread): at 128 registers (two CTAs per SM) 8-128-token
// steps ran a second wave and lost 10-50%.
constexpr int kMinBlocksPerSm = 3;
constexpr int64_t kStageBytes = 24 * 1024;  // one expand stage: B^T rows + output rows
constexpr int64_t kMaxSmemBytes = 200 * 1024;

// Copies one column vector into shared memory: cp.async for 16-byte vectors (asynchronous,
// waited for with cp_async_wait), a plain load and store for scalars. zero-fills when !valid
// (src must still be a mapped address; nothing is read from it).
template <typename T, int VEC>
__device__ __forceinline__ void stage_vec(void* dst, const T* src, bool valid) {
  if constexpr (kVecBytes<T, VEC> == 16) {
    ptx::cp_async16(ptx::smem_u32(dst), src, valid);
  } else {
    *static_cast<T*>(dst) = valid ? *src : detail::from_f32<T>(0.0f);
  }
}
// Shared-memory layout of one CTA, identical in every CTA of a cluster (DSMEM reads s_part at
// the same offset in a peer).
struct SmemLayout {
  int64_t pair_ids, row_weights, offsets, s_part, s_full, x_tile, stages, bytes;
  __host__ __device__ static SmemLayout of(const LoraArgs& a, int mt, int64_t piece,
                                           int elem_bytes) {
    SmemLayout l{};
    int64_t at = 0;
    const auto take = [&at](int64_t bytes) {
      const int64_t start = at;
      at += (bytes + 15) / 16 * 16;
      return start;
    };
    l.offsets = take(sizeof(int64_t) * a.num_slices * 2 * a.rank_stride);
    l.s_part = take(sizeof(float) * mt * a.num_slices * a.rank_stride);
    l.s_full = take(sizeof(float) * mt * a.num_slices * a.rank_stride);
    l.x_tile = take(int64_t{elem_bytes} * mt * piece);
    const int64_t item_rows = a.sorted_pairs != nullptr && a.block_m > 1 ? a.block_m : 1;
    l.pair_ids = take(sizeof(int32_t) * item_rows);
    l.row_weights = take(sizeof(float) * item_rows);
    l.stages = take(2 * kStageBytes);
    l.bytes = at;
    return l;
  }
};

// Column vectors one expand stage holds with `rows_b` B^T rows and `mt` output rows each.
__host__ __device__ __forceinline__ int64_t stage_vectors(int rows_b, int mt, int vec_bytes) {
  return kStageBytes / (int64_t{rows_b + mt} * vec_bytes);
}

struct ItemState {
  int32_t slot, expert;
  int32_t rank[kMaxSlices];
  int32_t rank_base[kMaxSlices];  // where slice i's ranks start in s_part / s_full rows
  int32_t total_rank;
  int32_t max_rank;  // over slices: B^T rows a column vector needs at most
  int32_t rows;      // valid pairs of the item
};

// Trip 1: the item's slot, expert and valid pairs (into pair_ids); ends with a barrier. The
// slot and the expert are loaded by warp 1 while warp 0 reads the pairs, so that no load waits
// for another.
constexpr int kHeadThread = 32;
__device__ void load_item_head(const LoraArgs& a, int64_t item, int32_t* pair_ids,
                               int32_t* shared_head) {
  if (a.sorted_pairs != nullptr) {
    if (threadIdx.x == kHeadThread) {
      const int32_t slot = a.block_slot[item * a.block_slot_stride];
      const int32_t expert =
          a.block_expert != nullptr ? a.block_expert[item * a.block_expert_stride] : 0;
      shared_head[0] = slot;
      shared_head[1] = expert;
    }
    const int n = compact_block_pairs(a, item, pair_ids);  // ends with a barrier
    if (threadIdx.x == 0) shared_head[2] = n;
  } else {
    const int32_t pair = static_cast<int32_t>(item);
    const bool valid = pair_valid(a, pair);
    if (threadIdx.x == 0) {
      pair_ids[0] = pair;
      shared_head[0] = valid ? a.token_slot[(pair / a.top_k) * a.token_slot_stride] : -1;
      shared_head[2] = valid ? 1 : 0;
    } else if (threadIdx.x == kHeadThread) {
      shared_head[1] = a.pair_expert != nullptr ? a.pair_expert[pair * a.pair_expert_stride] : 0;
    }
  }
  __syncthreads();
}

// Trip 2 (issue side), as cp.async copies into shared memory, committed by the caller: every
// slice's rank (shared_ranks[i], clamped by fill_state), its whole row-table entry of (slot,
// expert) (offsets[(slice * 2 + is_b) * rank_stride + k]; entries past the rank are copied but
// never used) and the routing weight of each of the item's `rows` pairs (row_weights).
__device__ void issue_item_tables(const LoraArgs& a, int32_t slot, int32_t expert, int rows,
                                  const int32_t* pair_ids, int32_t* shared_ranks,
                                  int64_t* offsets, float* row_weights) {
  for (int i = 0; i < a.num_slices; ++i) {
    const SliceArgs& s = a.slices[i];
    const bool known = slot >= 0 && slot < s.num_slots && expert >= 0 && expert < s.num_experts;
    if (threadIdx.x == kThreads - 1 - i) {  // the last warp: warp 0 has the most copies below
      if (known) {
        cp_async4(smem_u32(shared_ranks + i), s.ranks + slot * s.rank_slot_stride);
      } else {
        shared_ranks[i] = 0;
      }
    }
    if (!known || rows == 0) continue;
    const int64_t* table = s.row_offsets + slot * s.slot_stride + int64_t{expert} * 2 * s.max_rank;
    for (int j = threadIdx.x; j < 2 * s.max_rank; j += kThreads) {
      const int is_b = j >= s.max_rank;
      cp_async8(smem_u32(offsets + (i * 2 + is_b) * a.rank_stride + (j - is_b * s.max_rank)),
                table + j);
    }
  }
  if (a.weights != nullptr) {
    for (int m = threadIdx.x; m < rows; m += kThreads) {
      cp_async4(smem_u32(row_weights + m), a.weights + int64_t{pair_ids[m]} * a.weight_stride);
    }
  }
}

// After trip 2 has landed and a barrier: the per-slice ranks (clamped to [0, max_rank]) as
// ItemState.
__device__ void fill_state(const LoraArgs& a, const int32_t* head, const int32_t* shared_ranks,
                           ItemState& st) {
  st.slot = head[0];
  st.expert = head[1];
  st.rows = head[2];
  st.total_rank = 0;
  st.max_rank = 0;
#pragma unroll
  for (int i = 0; i < kMaxSlices; ++i) {
    st.rank[i] = i < a.num_slices && st.rows > 0
                     ? max(0, min(shared_ranks[i], a.slices[i].max_rank))
                     : 0;
    st.rank_base[i] = st.total_rank;
    st.total_rank += st.rank[i];
    st.max_rank = max(st.max_rank, st.rank[i]);
  }
}

// Slice and rank index of concatenated rank row j (j < total_rank).
__device__ __forceinline__ void rank_row(const ItemState& st, int num_slices, int j, int& slice,
                                         int& k) {
  slice = 0;
#pragma unroll
  for (int i = 1; i < kMaxSlices; ++i) {
    if (i < num_slices && j >= st.rank_base[i]) slice = i;
  }
  k = j - st.rank_base[slice];
}

// Slice of concatenated output column `col` and the column within it.
__device__ __forceinline__ int column_slice(const LoraArgs& a, int64_t& col) {
  int slice = 0;
  for (int i = 0; i + 1 < a.num_slices && col >= a.slices[i].out_dim; ++i) {
    col -= a.slices[i].out_dim;
    slice = i + 1;
  }
  return slice;
}

// Stages rows [m0, m0 + MT) of x, elements [p0, p0 + len), into x_tile (T, row stride piece).
template <typename T, int MT, int VEC>
__device__ void stage_x(const LoraArgs& a, const int32_t* pair_ids, int m0, int mt, int64_t p0,
                        int64_t len, int64_t piece, T* x_tile) {
  const T* input = static_cast<const T*>(a.input);
  for (int m = 0; m < MT; ++m) {
    const bool valid = m < mt;
    const T* x = valid ? input + (pair_ids[m0 + m] / a.input_pairs_per_row) * a.input_stride + p0
                       : input;
    for (int64_t e = int64_t{threadIdx.x} * VEC; e < len; e += kThreads * VEC) {
      stage_vec<T, VEC>(x_tile + m * piece + e, valid ? x + e : input, valid);
    }
  }
}

// One expand stage: column vectors [v0, v0 + n) of the concatenated output (vector units): for
// each, the B^T rows of its slice (k < rank) at stage[k * cap + v] and the mt output rows at
// stage[(max_rank + m) * cap + v], cap = vectors per stage.
template <typename T, int VEC>
__device__ void stage_expand(const LoraArgs& a, const ItemState& st, const int64_t* offsets,
                             const int32_t* pair_ids, int m0, int mt, int64_t v0, int64_t n,
                             int64_t cap, unsigned char* stage) {
  using Raw = RawVec<T, VEC>;
  Raw* dst = reinterpret_cast<Raw*>(stage);
  T* output = static_cast<T*>(a.output);
  const int count = static_cast<int>(n);
  // A vector's slice and column are worked out once per thread: with fewer vectors than
  // threads, `lanes` threads share a vector and take every lanes-th of its rows (dividing per
  // copy made the stage issue-bound at 128 tokens).
  const int lanes = max(1, kThreads / max(1, count));
  const int sub = threadIdx.x % lanes;
  for (int v = threadIdx.x / lanes; v < count; v += kThreads / lanes) {
    int64_t col = (v0 + v) * VEC;
    const int slice = column_slice(a, col);
    const int rank = st.rank[slice];
    const int64_t* b_offsets = offsets + (slice * 2 + 1) * a.rank_stride;
    const std::byte* arena = a.slices[slice].arena;
    for (int r = sub; r < rank; r += lanes) {
      stage_vec<T, VEC>(dst + r * cap + v, reinterpret_cast<const T*>(arena + b_offsets[r]) + col,
                        true);
    }
    if (rank == 0) continue;  // that slice's columns stay untouched
    for (int m = sub; m < mt; m += lanes) {
      const T* y = output + int64_t{pair_ids[m0 + m]} * a.output_stride +
                   a.slices[slice].col_offset + col;
      stage_vec<T, VEC>(dst + (st.max_rank + m) * cap + v, y, true);
    }
  }
}

// Adds s_full @ B^T to the staged output rows and writes them back.
template <typename T, int MT, int VEC>
__device__ void compute_expand(const LoraArgs& a, const ItemState& st, const float* s_full,
                               const int32_t* pair_ids, int m0, int mt, int64_t v0, int64_t n,
                               int64_t cap, const unsigned char* stage) {
  using Raw = RawVec<T, VEC>;
  const Raw* src = reinterpret_cast<const Raw*>(stage);
  T* output = static_cast<T*>(a.output);
  for (int64_t v = threadIdx.x; v < n; v += kThreads) {
    int64_t col = (v0 + v) * VEC;
    const int slice = column_slice(a, col);
    const int rank = st.rank[slice];
    if (rank == 0) continue;
    const float* s_rows = s_full + st.rank_base[slice];
    float acc[MT][VEC];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[m][i] = 0.0f;
    }
#pragma unroll 4
    for (int k = 0; k < rank; ++k) {
      float w[VEC];
      raw_to_f32<T, VEC>(src[k * cap + v], w);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float sk = s_rows[m * st.total_rank + k];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[m][i] = fmaf(sk, w[i], acc[m][i]);
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= mt) break;
      float cur[VEC];
      raw_to_f32<T, VEC>(src[(st.max_rank + m) * cap + v], cur);
#pragma unroll
      for (int i = 0; i < VEC; ++i) cur[i] += acc[m][i];
      T* y = output + int64_t{pair_ids[m0 + m]} * a.output_stride + a.slices[slice].col_offset +
             col;
      detail::store_from_f32<T, VEC>(y, cur);
    }
  }
}

// s_part[m][j] += sum over [p0, p0 + len) of x_tile[m] * A row j, for this warp's rank rows.
template <typename T, int MT, int VEC>
__device__ void shrink_piece(const LoraArgs& a, const ItemState& st, const int64_t* offsets,
                             const T* x_tile, int64_t piece, int64_t p0, int64_t len,
                             float* s_part) {
  using Raw = RawVec<T, VEC>;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int j0 = warp * kRowsPerWarpStep; j0 < st.total_rank; j0 += kWarps * kRowsPerWarpStep) {
    const T* rows[kRowsPerWarpStep];
#pragma unroll
    for (int r = 0; r < kRowsPerWarpStep; ++r) {
      const int j = min(j0 + r, st.total_rank - 1);  // duplicates are computed, not stored
      int slice, k;
      rank_row(st, a.num_slices, j, slice, k);
      rows[r] = reinterpret_cast<const T*>(a.slices[slice].arena +
                                           offsets[(slice * 2) * a.rank_stride + k]) + p0;
    }
    float acc[kRowsPerWarpStep][MT];
#pragma unroll
    for (int r = 0; r < kRowsPerWarpStep; ++r) {
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
    }
    // Several vector loads per row are issued before any is used: at decode the A rows are the
    // only DRAM reads left on the critical path.
    for (int64_t e0 = int64_t{lane} * VEC; e0 < len; e0 += 32 * VEC * kStepsInFlight<MT>) {
      Raw raw[kStepsInFlight<MT>][kRowsPerWarpStep];
#pragma unroll
      for (int u = 0; u < kStepsInFlight<MT>; ++u) {
        const int64_t e = e0 + int64_t{u} * 32 * VEC;
#pragma unroll
        for (int r = 0; r < kRowsPerWarpStep; ++r) {
          if (e < len) {
            if constexpr (kVecBytes<T, VEC> == 16) {
              raw[u][r] = __ldcs(reinterpret_cast<const uint4*>(rows[r] + e));
            } else {
              raw[u][r] = __ldg(rows[r] + e);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kStepsInFlight<MT>; ++u) {
        const int64_t e = e0 + int64_t{u} * 32 * VEC;
        if (e >= len) break;
        float xv[MT][VEC];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          raw_to_f32<T, VEC>(*reinterpret_cast<const Raw*>(x_tile + m * piece + e), xv[m]);
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarpStep; ++r) {
          float w[VEC];
          raw_to_f32<T, VEC>(raw[u][r], w);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[r][m] = fmaf(w[i], xv[m][i], acc[r][m]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarpStep; ++r) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float sum = detail::warp_sum(acc[r][m]);
        if (lane == 0 && j0 + r < st.total_rank) s_part[m * st.total_rank + j0 + r] += sum;
      }
    }
  }
}

template <typename T, int MT, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lora_cluster_kernel(const LoraArgs a, int64_t num_items, int64_t piece) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int32_t head[3];  // slot, expert, valid rows of the current item
  __shared__ int32_t shared_ranks[kMaxSlices];
  const Cluster cluster;
  const int csize = cluster.size();
  const int crank = cluster.rank();
  const SmemLayout layout = SmemLayout::of(a, MT, piece, sizeof(T));
  int32_t* pair_ids = reinterpret_cast<int32_t*>(smem + layout.pair_ids);
  float* row_weights = reinterpret_cast<float*>(smem + layout.row_weights);
  int64_t* offsets = reinterpret_cast<int64_t*>(smem + layout.offsets);
  float* s_part = reinterpret_cast<float*>(smem + layout.s_part);
  float* s_full = reinterpret_cast<float*>(smem + layout.s_full);
  T* x_tile = reinterpret_cast<T*>(smem + layout.x_tile);
  unsigned char* stages = smem + layout.stages;

  // This CTA's share of in_dim, and its part of the concatenated output columns (whole vectors):
  // column group blockIdx.z, cluster rank crank.
  const int64_t in_vecs = a.in_dim / VEC;
  const int64_t in_begin = in_vecs * crank / csize * VEC;
  const int64_t in_end = in_vecs * (crank + 1) / csize * VEC;
  int64_t width = 0;
  for (int i = 0; i < a.num_slices; ++i) width += a.slices[i].out_dim;
  const int64_t parts = int64_t{gridDim.z} * csize;
  const int64_t part = int64_t{blockIdx.z} * csize + crank;
  const int64_t out_vecs = width / VEC;
  const int64_t col_begin = out_vecs * part / parts;
  const int64_t col_end = out_vecs * (part + 1) / parts;

  PhaseTrace trace;
  trace.mark();  // 0: start
  // Everything above came from the parameters; memory only from here (common/launch.cuh).
  wait_for_previous_grid();
  trace.mark();  // 1: the grid ahead is done
  const int64_t items =
      a.sorted_pairs != nullptr ? detail::min64(num_items, *a.num_blocks) : num_items;
  bool peers_may_read = false;  // arrived after a reduction, not yet waited (uniform per cluster)
  for (int64_t item = blockIdx.y; item < items; item += gridDim.y) {
    load_item_head(a, item, pair_ids, head);  // trip 1
    trace.mark();                              // 2: trip 1 landed
    const int rows0 = min(MT, head[2]);
    // trip 2: x rows of the first row tile, ranks, row table and routing weights together
    if (head[2] > 0) {
      stage_x<T, MT, VEC>(a, pair_ids, 0, rows0, in_begin, detail::min64(piece, in_end - in_begin),
                          piece, x_tile);
    }
    issue_item_tables(a, head[0], head[1], head[2], pair_ids, shared_ranks, offsets, row_weights);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    trace.mark();  // 3: trip 2 landed
    ItemState st;
    fill_state(a, head, shared_ranks, st);
    if (st.total_rank == 0) {  // uniform over the cluster: same item, same answer
      __syncthreads();  // everyone has read the shared item state before the next item's
      continue;
    }
    const int64_t cap = stage_vectors(st.max_rank, MT, kVecBytes<T, VEC>);
    const int64_t num_stages = (col_end - col_begin + cap - 1) / cap;

    for (int m0 = 0; m0 < st.rows; m0 += MT) {
      const int mt = min(MT, st.rows - m0);
      if (m0 > 0) {
        stage_x<T, MT, VEC>(a, pair_ids, m0, mt, in_begin, detail::min64(piece, in_end - in_begin),
                            piece, x_tile);
        cp_async_commit();
      }
      // Trip 3 starts: the first two expand stages fly while the shrink reads A.
      const auto issue_stage = [&](int64_t s) {  // one cp.async group, empty past the last
        if (s < num_stages) {
          const int64_t v0 = col_begin + s * cap;
          stage_expand<T, VEC>(a, st, offsets, pair_ids, m0, mt, v0,
                               detail::min64(cap, col_end - v0), cap,
                               stages + (s & 1) * kStageBytes);
        }
        cp_async_commit();
      };
      issue_stage(0);
      issue_stage(1);

      // ---- 1. shrink: this CTA's in_dim range into s_part[m][j] ----
      if (peers_may_read) {  // the last reduction's reads of this s_part by the peers are done
        cluster.wait();
        peers_may_read = false;
      }
      for (int idx = threadIdx.x; idx < MT * st.total_rank; idx += kThreads) s_part[idx] = 0.0f;
      for (int64_t p0 = in_begin; p0 < in_end; p0 += piece) {
        const int64_t len = detail::min64(piece, in_end - p0);
        if (p0 == in_begin) {
          cp_async_wait<2>();  // x staged; the two expand stages may still fly
        } else {
          __syncthreads();  // the previous piece is consumed
          stage_x<T, MT, VEC>(a, pair_ids, m0, mt, p0, len, piece, x_tile);
          cp_async_commit();
          cp_async_wait<0>();
        }
        __syncthreads();
        shrink_piece<T, MT, VEC>(a, st, offsets, x_tile, piece, p0, len, s_part);
      }

      // ---- 2. cluster reduction of s through distributed shared memory ----
      trace.mark();  // 4: the shrink's A rows read
      cluster.sync();
      trace.mark();  // 5: every partial of the cluster written
      for (int idx = threadIdx.x; idx < MT * st.total_rank; idx += kThreads) {
        const int m = idx / st.total_rank;
        float v = 0.0f;
        for (int r = 0; r < csize; ++r) v += cluster.peer(s_part, r)[idx];
        if (a.weights != nullptr && m < mt) v *= row_weights[m0 + m];
        s_full[idx] = v;
      }
      // Done reading the peers' s_part: arrive now, wait only before s_part is written again or
      // the CTA exits (its shared memory must outlive the peers' reads), so the barrier's round
      // trip overlaps the expand instead of preceding it.
      cluster.arrive();
      peers_may_read = true;
      // Clusters of C > 1 (few items, latency-bound steps) let the next grid start before
      // their last expand; with C = 1 (a wave of single CTAs) the next grid waits for the exit
      // (docs/performance.md, "PDL").
      if (csize > 1 && item + gridDim.y >= items && m0 + MT >= st.rows) release_next_grid();
      __syncthreads();  // s_full is visible to the whole CTA
      trace.mark();     // 6: reduced

      // ---- 3. expand: this CTA's column part, stage by stage, double-buffered ----
      for (int64_t s = 0; s < num_stages; ++s) {
        const int64_t v0 = col_begin + s * cap;
        cp_async_wait<1>();  // stage s landed (stage s + 1, maybe empty, may still fly)
        __syncthreads();
        compute_expand<T, MT, VEC>(a, st, s_full, pair_ids, m0, mt, v0,
                                   detail::min64(cap, col_end - v0), cap,
                                   stages + (s & 1) * kStageBytes);
        __syncthreads();  // this stage buffer is free for stage s + 2
        issue_stage(s + 2);
      }
      cp_async_wait<0>();
    }
    __syncthreads();  // the next item rewrites pair_ids, offsets and the item state
  }
  trace.mark();  // 7: expanded (stores issued)
  trace.print(a);
  if (peers_may_read) cluster.wait();
}

// Clusters of `cluster_size` CTAs of `kernel` (kThreads threads, `smem` bytes of dynamic shared
// memory each) that the GPU holds at once, from the occupancy API; with cluster_size 1, the
// resident CTAs. A cluster's CTAs must share one GPC, so this can be well below resident CTAs /
// cluster_size (docs/performance.md, "Decode kernel"). Cached per (device, kernel, size, shared
// memory): the decode step asks on every call.
int64_t resident_clusters(const void* kernel, int cluster_size, int64_t smem) {
  if (smem > kMaxSmemBytes) return 0;
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, int64_t>, int64_t> cache;
  int device = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(device, kernel, cluster_size, smem);
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto found = cache.find(key); found != cache.end()) return found->second;
  // Once per kernel and size, before the first query (and so before the first launch) of a
  // cluster wider than 8; the attribute stays set.
  if (cluster_size > plan_rules::kMaxPortableCluster) {
    MOELORA_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  }
  detail::allow_dynamic_smem(kernel, static_cast<size_t>(smem));
  int64_t count = 0;
  if (cluster_size == 1) {
    int per_sm = 0;
    MOELORA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, kernel, kThreads, static_cast<size_t>(smem)));
    count = int64_t{per_sm} * detail::sm_count();
  } else {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(cluster_size));
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = static_cast<size_t>(smem);
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = static_cast<unsigned>(cluster_size);
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int clusters = 0;
    MOELORA_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
    count = clusters;
  }
  cache.emplace(key, count);
  return count;
}

template <typename T, int MT, int VEC>
bool launch(const LoraArgs& a, int64_t num_items, int64_t launch_items, const LoraPlan& plan,
            cudaStream_t stream) {
  const auto kernel = lora_cluster_kernel<T, MT, VEC>;
  const auto resident = [&](int cluster_size, int64_t piece) {
    return resident_clusters(reinterpret_cast<const void*>(kernel), cluster_size,
                             SmemLayout::of(a, MT, piece, sizeof(T)).bytes);
  };
  int64_t width = 0;
  for (int i = 0; i < a.num_slices; ++i) width += a.slices[i].out_dim;
  const int32_t limit =
      plan_rules::decode_cluster_limit(a.in_dim, plan, device_props(DeviceKind::kCUDA, -1));
  const plan_rules::DecodeShape shape = plan_rules::decode_shape(
      a.in_dim, width, sizeof(T), kVecBytes<T, VEC>, launch_items, limit, resident);
  const SmemLayout layout = SmemLayout::of(a, MT, shape.piece, sizeof(T));
  if (layout.bytes > kMaxSmemBytes) return false;
  detail::allow_dynamic_smem(kernel, static_cast<size_t>(layout.bytes));
  // One wave of clusters; more items are walked grid-stride by the same clusters.
  const int64_t max_clusters = std::max<int64_t>(1, shape.resident_clusters / shape.column_groups);
  const dim3 grid(static_cast<unsigned>(shape.cluster_size),
                  static_cast<unsigned>(std::min({launch_items, max_clusters, int64_t{65535}})),
                  static_cast<unsigned>(shape.column_groups));
  launch_kernel(kernel,
                LaunchShape{grid, dim3(kThreads), static_cast<size_t>(layout.bytes), stream,
                            shape.cluster_size, plan.pdl},
                a, num_items, shape.piece);
  detail::check_launch("fused_moe_lora cluster");
  return true;
}

// Unsorted items are single pairs (one row), grouped ones blocks of up to 4-row tiles; 16-byte
// vectors when every row and column range allows them, scalars otherwise.
template <typename T>
bool launch_for_layout(const LoraArgs& a, bool vectorized, int64_t num_items,
                       int64_t launch_items, const LoraPlan& plan, cudaStream_t stream) {
  constexpr int v = detail::kVec16<T>;
  const bool unsorted = a.sorted_pairs == nullptr;
  if (vectorized) {
    return unsorted ? launch<T, 1, v>(a, num_items, launch_items, plan, stream)
                    : launch<T, 4, v>(a, num_items, launch_items, plan, stream);
  }
  return unsorted ? launch<T, 1, 1>(a, num_items, launch_items, plan, stream)
                  : launch<T, 4, 1>(a, num_items, launch_items, plan, stream);
}

}  // namespace

bool launch_lora_cluster(const LoraArgs& a, DType dtype, LoraVectorization vec, int64_t num_items,
                         int64_t launch_items, const LoraPlan& plan, cudaStream_t stream) {
  if (num_items <= 0) return true;
  launch_items = std::clamp<int64_t>(launch_items, 1, num_items);
  const bool vectorized = vec.input && vec.output;
  const int vec_bytes = vectorized ? 16 : static_cast<int>(dtype_size(dtype));
  const int mt = a.sorted_pairs == nullptr ? 1 : 4;
  // One stage must hold at least one column vector with all its B^T rows (huge ranks: no).
  if (stage_vectors(a.rank_stride, mt, vec_bytes) < 1) return false;
  bool launched = false;
  MOELORA_DISPATCH_FLOAT(dtype, T, launched = launch_for_layout<T>(a, vectorized, num_items,
                                                                   launch_items, plan, stream));
  return launched;
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
