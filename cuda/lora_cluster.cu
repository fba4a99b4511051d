// The decode kernel of fused_moe_lora / dense_lora: one thread-block cluster per work item (a
// block of pairs sharing (slot, expert), or a single pair in the unsorted form), shrink and
// expand in ONE launch, Split-K through distributed shared memory, no workspace, no atomics.
//
// Why: at decode every (slot, expert) group holds about one row, so the work is streaming each
// touched A and B^T row once; v1 spent 4-7 us per kernel on chains of dependent DRAM loads and
// needed 5 launches per layer. Here, per item:
//   1. every CTA of the cluster stages the item's row offsets (all slices, A and B) in shared
//      memory with one parallel load, then takes 1/C of in_dim: warps stream 4 A rows at a time
//      with 16-byte loads against up to MT input rows staged as fp32 and reduce across lanes
//      into this CTA's partial s_part[MT][sum of ranks];
//   2. cluster.sync(); each CTA sums the C partials (DSMEM reads, fixed order, so repeated runs
//      are bit-identical), applies the routing weight, keeps s_full in its shared memory;
//      cluster.sync() again so no partial is overwritten while another CTA still reads it;
//   3. each CTA owns 1/C of the concatenated output columns of all slices: a thread streams the
//      rank B^T rows of one 8-column vector and read-modify-writes MT output rows (one rounding
//      per element, one owner per element).
// C (cluster size, <= 8, portable) is picked on the host so that items * C CTAs cover the SMs
// about twice while each CTA keeps >= 256 input elements; with many items C = 1 and the kernel
// is a plain one-CTA-per-item kernel. Items are walked grid-stride (uniform per cluster).
// Template space: T in {float, half, bf16} x MT in {1 (unsorted), 4 (grouped)} x VEC in {16-byte
// vectors, scalars (rows or column ranges not 16-byte aligned)}.
#include <cooperative_groups.h>

#include <algorithm>

#include "common.cuh"
#include "lora_kernels.h"

namespace moelora::cuda {

namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarpStep = 4;     // A rows a warp streams together (loads in flight)
constexpr int64_t kMaxPiece = 2048;     // input elements staged per pass (fp32: MT * 8 KB)
constexpr int kMaxClusterSize = 8;      // the portable cluster size limit
constexpr int64_t kMaxSmemBytes = 200 * 1024;

// Shared-memory layout of one CTA, identical in every CTA of a cluster (DSMEM reads s_part at
// the same offset in a peer).
struct SmemLayout {
  int64_t pair_ids, offsets, s_part, s_full, x_tile, bytes;
  __host__ __device__ static SmemLayout of(const LoraArgs& a, int mt, int64_t piece) {
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
    l.x_tile = take(sizeof(float) * mt * piece);
    l.pair_ids = take(sizeof(int32_t) * (a.sorted_pairs != nullptr && a.block_m > 1 ? a.block_m : 1));
    l.bytes = at;
    return l;
  }
};

// Thread-block clusters exist from sm_90 on; an older architecture runs clusters of one CTA
// (the host launches it so), where the cluster calls reduce to the CTA's own.
struct Cluster {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __device__ int size() const { return static_cast<int>(cg::this_cluster().num_blocks()); }
  __device__ int rank() const { return static_cast<int>(cg::this_cluster().block_rank()); }
  __device__ void sync() const { cg::this_cluster().sync(); }
  __device__ float* peer(float* local, int r) const {
    return cg::this_cluster().map_shared_rank(local, r);
  }
#else
  __device__ int size() const { return 1; }
  __device__ int rank() const { return 0; }
  __device__ void sync() const { __syncthreads(); }
  __device__ float* peer(float* local, int) const { return local; }
#endif
};

struct ItemState {
  int32_t slot, expert;
  int32_t rank[kMaxSlices];
  int32_t rank_base[kMaxSlices];  // where slice i's ranks start in s_part / s_full rows
  int32_t total_rank;
  int32_t rows;  // valid pairs of the item
};

// Reads the item's slot/expert/ranks and its valid pairs (into pair_ids); every thread gets
// the same state. Ends with a barrier.
__device__ void load_item(const LoraArgs& a, int64_t item, int32_t* pair_ids, ItemState& st) {
  __shared__ int32_t shared_rows, shared_slot, shared_expert;
  if (a.sorted_pairs != nullptr) {
    if (threadIdx.x == 0) {
      shared_slot = a.block_slot[item * a.block_slot_stride];
      shared_expert = a.block_expert != nullptr ? a.block_expert[item * a.block_expert_stride] : 0;
    }
    const int n = compact_block_pairs(a, item, pair_ids);  // ends with a barrier
    if (threadIdx.x == 0) shared_rows = n;
  } else if (threadIdx.x == 0) {
    const int32_t pair = static_cast<int32_t>(item);
    const bool valid = pair_valid(a, pair);
    shared_rows = valid ? 1 : 0;
    pair_ids[0] = pair;
    shared_slot = valid ? a.token_slot[(pair / a.top_k) * a.token_slot_stride] : -1;
    shared_expert = a.pair_expert != nullptr ? a.pair_expert[pair * a.pair_expert_stride] : 0;
  }
  __syncthreads();
  st.slot = shared_slot;
  st.expert = shared_expert;
  st.rows = shared_rows;
  st.total_rank = 0;
#pragma unroll
  for (int i = 0; i < kMaxSlices; ++i) {
    st.rank[i] = 0;
    st.rank_base[i] = st.total_rank;
    if (i < a.num_slices && st.rows > 0) {
      st.rank[i] = slice_info(a.slices[i], st.slot, st.expert).rank;
      st.total_rank += st.rank[i];
    }
  }
}

// All row offsets of the item: offsets[(slice * 2 + is_b) * rank_stride + k].
__device__ void stage_offsets(const LoraArgs& a, const ItemState& st, int64_t* offsets) {
  for (int i = 0; i < a.num_slices; ++i) {
    const SliceArgs& s = a.slices[i];
    const int64_t* table =
        s.row_offsets + st.slot * s.slot_stride + int64_t{st.expert} * 2 * s.max_rank;
    for (int j = threadIdx.x; j < 2 * st.rank[i]; j += kThreads) {
      const int is_b = j >= st.rank[i];
      const int k = j - is_b * st.rank[i];
      offsets[(i * 2 + is_b) * a.rank_stride + k] = table[is_b * s.max_rank + k];
    }
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

template <typename T, int MT, int VEC>
__global__ void __launch_bounds__(kThreads) lora_cluster_kernel(const LoraArgs a, int64_t num_items,
                                                                int64_t piece) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Cluster cluster;
  const int csize = cluster.size();
  const int crank = cluster.rank();
  const SmemLayout layout = SmemLayout::of(a, MT, piece);
  int32_t* pair_ids = reinterpret_cast<int32_t*>(smem + layout.pair_ids);
  int64_t* offsets = reinterpret_cast<int64_t*>(smem + layout.offsets);
  float* s_part = reinterpret_cast<float*>(smem + layout.s_part);
  float* s_full = reinterpret_cast<float*>(smem + layout.s_full);
  float* x_tile = reinterpret_cast<float*>(smem + layout.x_tile);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const T* input = static_cast<const T*>(a.input);
  T* output = static_cast<T*>(a.output);
  const int64_t items = a.sorted_pairs != nullptr ? detail::min64(num_items, *a.num_blocks) : num_items;

  // This CTA's share of in_dim and of the concatenated output columns (whole vectors).
  const int64_t in_vecs = a.in_dim / VEC;
  const int64_t in_begin = in_vecs * crank / csize * VEC;
  const int64_t in_end = in_vecs * (crank + 1) / csize * VEC;
  int64_t width = 0;
  for (int i = 0; i < a.num_slices; ++i) width += a.slices[i].out_dim;
  const int64_t out_vecs = width / VEC;
  const int64_t col_begin = out_vecs * crank / csize;
  const int64_t col_end = out_vecs * (crank + 1) / csize;

  for (int64_t item = blockIdx.y; item < items; item += gridDim.y) {
    ItemState st;
    load_item(a, item, pair_ids, st);
    if (st.total_rank == 0) {  // uniform over the cluster: same item, same answer
      __syncthreads();  // everyone has read the shared item state before the next item's
      continue;
    }
    stage_offsets(a, st, offsets);

    for (int m0 = 0; m0 < st.rows; m0 += MT) {
      const int mt = min(MT, st.rows - m0);
      // ---- 1. shrink: this CTA's in_dim range into s_part[m][j] ----
      for (int idx = threadIdx.x; idx < MT * st.total_rank; idx += kThreads) s_part[idx] = 0.0f;
      for (int64_t p0 = in_begin; p0 < in_end; p0 += piece) {
        const int64_t len = detail::min64(piece, in_end - p0);
        __syncthreads();  // offsets staged; previous piece's x_tile and s_part updates done
        for (int m = 0; m < MT; ++m) {
          const bool valid = m < mt;
          const T* x = valid ? input + (pair_ids[m0 + m] / a.input_pairs_per_row) * a.input_stride + p0
                             : nullptr;
          for (int64_t e = int64_t{threadIdx.x} * VEC; e < len; e += kThreads * VEC) {
            float v[VEC];
            if (valid) {
              detail::load_f32<T, VEC>(x + e, v);
            } else {
#pragma unroll
              for (int i = 0; i < VEC; ++i) v[i] = 0.0f;
            }
#pragma unroll
            for (int i = 0; i < VEC; ++i) x_tile[m * piece + e + i] = v[i];
          }
        }
        __syncthreads();
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
          for (int64_t e = int64_t{lane} * VEC; e < len; e += 32 * VEC) {
            float w[kRowsPerWarpStep][VEC];
#pragma unroll
            for (int r = 0; r < kRowsPerWarpStep; ++r) detail::load_f32_stream<T, VEC>(rows[r] + e, w[r]);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              const float* xs = x_tile + m * piece + e;
#pragma unroll
              for (int i = 0; i < VEC; ++i) {
                const float xv = xs[i];
#pragma unroll
                for (int r = 0; r < kRowsPerWarpStep; ++r) acc[r][m] = fmaf(w[r][i], xv, acc[r][m]);
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

      // ---- 2. cluster reduction of s through distributed shared memory ----
      cluster.sync();
      for (int idx = threadIdx.x; idx < MT * st.total_rank; idx += kThreads) {
        const int m = idx / st.total_rank;
        float v = 0.0f;
        for (int r = 0; r < csize; ++r) v += cluster.peer(s_part, r)[idx];
        if (a.weights != nullptr && m < mt) {
          v *= a.weights[int64_t{pair_ids[m0 + m]} * a.weight_stride];
        }
        s_full[idx] = v;
      }
      cluster.sync();  // peers are done reading s_part; s_full is visible to the whole CTA

      // ---- 3. expand: this CTA's output vectors ----
      for (int64_t cv = col_begin + threadIdx.x; cv < col_end; cv += kThreads) {
        int64_t col = cv * VEC;
        int slice = 0;
        for (int i = 0; i + 1 < a.num_slices && col >= a.slices[i].out_dim; ++i) {
          col -= a.slices[i].out_dim;
          slice = i + 1;
        }
        const int rank = st.rank[slice];
        if (rank == 0) continue;
        const std::byte* arena = a.slices[slice].arena;
        const int64_t* b_offsets = offsets + (slice * 2 + 1) * a.rank_stride;
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
          detail::load_f32_stream<T, VEC>(reinterpret_cast<const T*>(arena + b_offsets[k]) + col, w);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float sk = s_rows[m * st.total_rank + k];
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[m][i] = fmaf(sk, w[i], acc[m][i]);
          }
        }
        for (int m = 0; m < mt; ++m) {
          T* y = output + int64_t{pair_ids[m0 + m]} * a.output_stride + a.slices[slice].col_offset + col;
          float cur[VEC];
          detail::load_f32<T, VEC>(y, cur);
#pragma unroll
          for (int i = 0; i < VEC; ++i) cur[i] += acc[m][i];
          detail::store_from_f32<T, VEC>(y, cur);
        }
      }
    }
    __syncthreads();  // the next item rewrites pair_ids and offsets
  }
}

template <typename T, int MT, int VEC>
void launch(const LoraArgs& a, int64_t num_items, int cluster_size, int64_t piece,
            cudaStream_t stream) {
  const SmemLayout layout = SmemLayout::of(a, MT, piece);
  const auto kernel = lora_cluster_kernel<T, MT, VEC>;
  MOELORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(layout.bytes)));
  // Enough clusters for ~4 waves; the rest are walked grid-stride by the same clusters.
  const int64_t max_clusters =
      std::max<int64_t>(1, 4 * int64_t{detail::sm_count()} / cluster_size);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(cluster_size),
                        static_cast<unsigned>(std::min({num_items, max_clusters, int64_t{65535}})));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(layout.bytes);
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster_size);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = cluster_size > 1 ? 1 : 0;  // no cluster attribute before sm_90
  MOELORA_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, a, num_items, piece));
  detail::check_launch("fused_moe_lora cluster");
}

template <typename T, int VEC>
void launch_for_rows(const LoraArgs& a, int64_t num_items, int cluster_size, int64_t piece,
                     cudaStream_t stream) {
  if (a.sorted_pairs == nullptr) {
    launch<T, 1, VEC>(a, num_items, cluster_size, piece, stream);
  } else {
    launch<T, 4, VEC>(a, num_items, cluster_size, piece, stream);
  }
}

// 16-byte vectors when every row and column range allows them, scalars otherwise.
template <typename T>
void launch_for_layout(const LoraArgs& a, bool vectorized, int64_t num_items, int cluster_size,
                       int64_t piece, cudaStream_t stream) {
  if (vectorized) {
    launch_for_rows<T, detail::kVec16<T>>(a, num_items, cluster_size, piece, stream);
  } else {
    launch_for_rows<T, 1>(a, num_items, cluster_size, piece, stream);
  }
}

}  // namespace

bool launch_lora_cluster(const LoraArgs& a, DType dtype, LoraVectorization vec, int64_t num_items,
                         cudaStream_t stream) {
  if (num_items <= 0) return true;
  // Cluster size: ~2 waves of CTAs, each CTA keeping >= 256 input elements and >= 1 vector of
  // output columns.
  const int64_t sms = detail::sm_count();
  // clusters exist from sm_90 on
  const int64_t max_cluster = detail::compute_capability_major() >= 9 ? kMaxClusterSize : 1;
  const int64_t wanted = (2 * sms + num_items - 1) / num_items;
  const int64_t by_input = std::max<int64_t>(1, a.in_dim / 256);
  const int cluster_size =
      static_cast<int>(std::max<int64_t>(1, std::min({wanted, by_input, max_cluster})));
  const int64_t share = (a.in_dim + cluster_size - 1) / cluster_size;
  const int64_t piece = std::min<int64_t>(kMaxPiece, (share + 7) / 8 * 8);
  if (SmemLayout::of(a, 4, piece).bytes > kMaxSmemBytes) return false;  // huge ranks
  const bool vectorized = vec.input && vec.output;
  MOELORA_DISPATCH_FLOAT(dtype, T,
                         launch_for_layout<T>(a, vectorized, num_items, cluster_size, piece, stream));
  return true;
}

}  // namespace moelora::cuda
