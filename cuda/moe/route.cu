// moe_route on the GPU (contract: include/moelora/moe.h): top-k, routing weights and the pairs
// grouped by expert into blocks, in ONE launch with fixed-size outputs and no host sync.
//
// Grid mapping: one warp per token (tokens strided over all warps of the grid). A lane holds
// logits e = lane + 32 i (i < kPer, the smallest power of two with 32 kPer >= E, a template
// constant so that E = 32 scans one value, not 16) as order-preserving 32-bit keys (NaN as -inf,
// -0 as +0) and keeps its best untaken one; each of the K rounds takes the warp's best with two
// redux.sync (largest key, then lowest id among equal keys), the owning lane alone rescans, and
// lane k keeps the k-th choice, so K <= 32. Weights: softmax over the K choices (GPT-OSS) or
// over all E with optional renormalisation, in float32 with expf.
// Grouping: counts per expert, blocks per expert = ceil(count / block_m), a CTA-wide exclusive
// scan over experts gives each expert's first row, padding rows are -1, and every pair takes the
// next row of its expert with an atomic increment (so an expert's pairs are in no fixed order;
// nothing downstream depends on it).
// Two forms of the same code:
//   single CTA (steps up to kSingleCtaMaxTokens tokens: decode): 1024 threads, counters in
//     shared memory, launched with programmatic dependent launch;
//   cooperative (larger steps): one CTA of 256 threads per group of tokens, all resident; the
//     counters and cursors live in the workspace ([2][E] int32), two grid barriers (zeroed ->
//     counted -> placed); every CTA computes the same layout from the global counts, CTA 0
//     writes the block table and the padding, each CTA places its own tokens' pairs.
// Memory-bound on nothing: at decode it is one CTA's latency (a few microseconds at most).
#include <cooperative_groups.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "common/launch.cuh"
#include "kernels/moe_kernels.h"

namespace moelora::cuda {

namespace {

constexpr int kMaxPerLane = kMoeMaxExperts / 32;  // logits a lane holds, at most
constexpr int kMaxTopK = 32;                      // one lane per choice
constexpr int kSingleThreads = 1024;
constexpr int kMultiThreads = 256;
constexpr int64_t kSingleCtaMaxTokens = 128;
static_assert(kMoeMaxExperts % 32 == 0, "experts spread evenly over the lanes");

struct RouteArgs {
  const void* logits;  // [T, E] row stride logits_stride (elements)
  int64_t logits_stride;
  int64_t num_tokens;
  int32_t num_experts, top_k, block_m;
  bool softmax_all;  // MoeRouting::kSoftmaxTopk
  bool renormalize;
  int32_t* topk_ids;       // [T, K] contiguous
  float* topk_weights;     // [T, K] contiguous
  int32_t* sorted_pairs;   // [sorted_len] contiguous
  int64_t sorted_len;
  int32_t* block_expert;   // [max_blocks] contiguous
  int64_t max_blocks;
  int32_t* num_blocks;     // [1]
  int32_t* expert_counts;  // [E]
  int32_t* global_counts;  // cooperative form: [2][E] (counts, cursors)
};

// Shared memory of either form.
struct RouteShared {
  int32_t counts[kMoeMaxExperts];
  int32_t first_row[kMoeMaxExperts];  // then the next free row of each expert
  int32_t warp_sums[32];
  int32_t total_blocks;
};

// Order-preserving key of a logit: a larger logit has a larger key; NaN ranks as -inf, -0 as +0;
// 0 is below every key (no candidate).
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t bits = __float_as_uint(isnan(v) ? -INFINITY : v + 0.0f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

template <typename T>
__device__ __forceinline__ float logit(const RouteArgs& a, int64_t t, int32_t e) {
  return detail::to_f32(static_cast<const T*>(a.logits)[t * a.logits_stride + e]);
}

// The lane's best candidate (largest key, lowest i among equal keys) and its raw logit.
template <int kPer>
__device__ __forceinline__ void lane_best(const uint32_t (&key)[kPer], const float (&raw)[kPer],
                                          uint32_t& best, int& best_i, float& best_raw) {
  best = 0;
  best_i = 0;
  best_raw = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    if (key[i] > best) {
      best = key[i];
      best_i = i;
      best_raw = raw[i];
    }
  }
}

// Top-k and weights of token t by one warp; writes topk_ids / topk_weights and returns, in lane
// k < K, the k-th expert (-1 in the other lanes).
template <typename T, int kPer>
__device__ int32_t route_token(const RouteArgs& a, int64_t t) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  float raw[kPer];
  uint32_t key[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int32_t e = lane + 32 * i;
    raw[i] = e < a.num_experts ? logit<T>(a, t, e) : -INFINITY;
    key[i] = e < a.num_experts ? order_key(raw[i]) : 0u;
  }
  uint32_t best;
  int best_i;
  float best_raw;
  lane_best(key, raw, best, best_i, best_raw);
  int32_t my_id = -1;
  float my_raw = 0.0f, top = 0.0f;
  for (int k = 0; k < a.top_k; ++k) {
    const uint32_t win_key = __reduce_max_sync(0xffffffffu, best);
    const uint32_t mine = best == win_key ? static_cast<uint32_t>(lane + 32 * best_i) : ~0u;
    const int32_t win_id = static_cast<int32_t>(__reduce_min_sync(0xffffffffu, mine));
    const int owner = win_id & 31;
    const float win_raw = __shfl_sync(0xffffffffu, best_raw, owner);
    if (k == 0) top = isnan(win_raw) ? -INFINITY : win_raw;
    if (lane == k) {
      my_id = win_id;
      my_raw = win_raw;
    }
    if (lane == owner) {  // take it, rescan this lane's rest
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        if (i == best_i) key[i] = 0u;
      }
      lane_best(key, raw, best, best_i, best_raw);
    }
  }
  const bool chosen = lane < a.top_k;
  float w = chosen ? expf(my_raw - top) : 0.0f;
  if (a.softmax_all) {
    float denominator = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (lane + 32 * i < a.num_experts) denominator += expf(raw[i] - top);
    }
    w /= detail::warp_sum(denominator);
    if (a.renormalize) w /= detail::warp_sum(w);
  } else {
    w /= detail::warp_sum(w);
  }
  if (chosen) {
    a.topk_ids[t * a.top_k + lane] = my_id;
    a.topk_weights[t * a.top_k + lane] = w;
  }
  return my_id;
}

// Exclusive scan over the experts of blocks per expert: fills first_row (rows, multiples of
// block_m) and total_blocks. Thread i owns experts [i * per, (i + 1) * per).
__device__ void layout_blocks(const RouteArgs& a, RouteShared& s) {
  const int threads = static_cast<int>(blockDim.x);
  const int per = (a.num_experts + threads - 1) / threads;
  const int first = static_cast<int>(threadIdx.x) * per;
  int32_t mine = 0;
  for (int e = first; e < first + per && e < a.num_experts; ++e) {
    mine += (s.counts[e] + a.block_m - 1) / a.block_m;
  }
  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  int32_t inclusive = mine;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int32_t other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) s.warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int warps = threads >> 5;
    const int32_t v = lane < warps ? s.warp_sums[lane] : 0;
    int32_t scan = v;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int32_t other = __shfl_up_sync(0xffffffffu, scan, offset);
      if (lane >= offset) scan += other;
    }
    if (lane < warps) s.warp_sums[lane] = scan - v;  // exclusive over warps
    if (lane == 31) s.total_blocks = scan;
  }
  __syncthreads();
  int32_t block = s.warp_sums[warp] + inclusive - mine;
  for (int e = first; e < first + per && e < a.num_experts; ++e) {
    s.first_row[e] = block * a.block_m;
    block += (s.counts[e] + a.block_m - 1) / a.block_m;
  }
  __syncthreads();
}

// The block table, num_blocks, expert_counts and every padding row of sorted_pairs (by the
// threads of one CTA); the placed rows are the pairs'.
__device__ void write_layout(const RouteArgs& a, const RouteShared& s) {
  const int64_t blocks = s.total_blocks;
  for (int e = static_cast<int>(threadIdx.x); e < a.num_experts; e += blockDim.x) {
    const int64_t first = s.first_row[e];
    const int64_t rows = int64_t{(s.counts[e] + a.block_m - 1) / a.block_m} * a.block_m;
    for (int64_t b = first / a.block_m; b < (first + rows) / a.block_m; ++b) a.block_expert[b] = e;
    for (int64_t r = first + s.counts[e]; r < first + rows; ++r) a.sorted_pairs[r] = -1;
    a.expert_counts[e] = s.counts[e];
  }
  for (int64_t b = blocks + threadIdx.x; b < a.max_blocks; b += blockDim.x) a.block_expert[b] = -1;
  for (int64_t r = blocks * a.block_m + threadIdx.x; r < a.sorted_len; r += blockDim.x) {
    a.sorted_pairs[r] = -1;
  }
  if (threadIdx.x == 0) *a.num_blocks = static_cast<int32_t>(blocks);
}

template <typename T, int kPer>
__global__ void __launch_bounds__(kSingleThreads) route_single_kernel(RouteArgs a) {
  __shared__ RouteShared s;
  __shared__ int32_t pair_expert[kSingleCtaMaxTokens * kMaxTopK];  // expert of each pair
  wait_for_previous_grid();  // memory only from here (common/launch.cuh)
  for (int e = static_cast<int>(threadIdx.x); e < a.num_experts; e += blockDim.x) s.counts[e] = 0;
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x >> 5), warps = static_cast<int>(blockDim.x >> 5);
  const int lane = static_cast<int>(threadIdx.x & 31);
  for (int64_t t = warp; t < a.num_tokens; t += warps) {
    const int32_t e = route_token<T, kPer>(a, t);
    if (e >= 0) {
      atomicAdd(&s.counts[e], 1);
      pair_expert[t * a.top_k + lane] = e;
    }
  }
  __syncthreads();
  layout_blocks(a, s);
  write_layout(a, s);
  __syncthreads();  // write_layout reads first_row, which the placement below advances
  release_next_grid();
  const int64_t num_pairs = a.num_tokens * a.top_k;
  for (int64_t p = threadIdx.x; p < num_pairs; p += blockDim.x) {
    a.sorted_pairs[atomicAdd(&s.first_row[pair_expert[p]], 1)] = static_cast<int32_t>(p);
  }
}

template <typename T, int kPer>
__global__ void __launch_bounds__(kMultiThreads) route_multi_kernel(RouteArgs a) {
  __shared__ RouteShared s;
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  int32_t* counts = a.global_counts;
  int32_t* cursors = a.global_counts + a.num_experts;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < 2 * a.num_experts;
       i += int64_t{gridDim.x} * blockDim.x) {
    counts[i] = 0;  // counts and cursors
  }
  for (int e = static_cast<int>(threadIdx.x); e < a.num_experts; e += blockDim.x) s.counts[e] = 0;
  __syncthreads();
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x >> 5);
  const int64_t warp = blockIdx.x * int64_t{blockDim.x >> 5} + (threadIdx.x >> 5);
  grid.sync();  // the global counters are zero

  for (int64_t t = warp; t < a.num_tokens; t += warps) {
    const int32_t e = route_token<T, kPer>(a, t);
    if (e >= 0) atomicAdd(&s.counts[e], 1);
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < a.num_experts; e += blockDim.x) {
    if (s.counts[e] > 0) atomicAdd(&counts[e], s.counts[e]);
  }
  grid.sync();  // every pair is counted

  for (int e = static_cast<int>(threadIdx.x); e < a.num_experts; e += blockDim.x) {
    s.counts[e] = counts[e];
  }
  __syncthreads();
  layout_blocks(a, s);
  if (blockIdx.x == 0) write_layout(a, s);
  const int lane = static_cast<int>(threadIdx.x & 31);
  for (int64_t t = warp; t < a.num_tokens; t += warps) {  // this warp's own tokens
    if (lane < a.top_k) {
      const int64_t p = t * a.top_k + lane;
      const int32_t e = a.topk_ids[p];
      a.sorted_pairs[s.first_row[e] + atomicAdd(&cursors[e], 1)] = static_cast<int32_t>(p);
    }
  }
}

template <typename T, int kPer>
int multi_ctas_resident() {
  int per_sm = 0;
  MOELORA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, route_multi_kernel<T, kPer>, kMultiThreads, 0));
  return per_sm * detail::sm_count();
}

template <typename T, int kPer>
void launch_route(const RouteArgs& a, cudaStream_t stream, void* workspace) {
  const bool single = a.num_tokens <= kSingleCtaMaxTokens || !detail::cooperative_launch();
  if (single) {
    LaunchShape shape;
    shape.grid = dim3(1);
    shape.block = dim3(kSingleThreads);
    shape.stream = stream;
    shape.after_previous_grid = true;
    launch_kernel(route_single_kernel<T, kPer>, shape, a);
    return;
  }
  RouteArgs m = a;
  const size_t bytes = 2 * sizeof(int32_t) * static_cast<size_t>(a.num_experts);
  const bool own = workspace == nullptr;
  m.global_counts = static_cast<int32_t*>(own ? detail::scratch_alloc(bytes, stream) : workspace);
  static const int resident = multi_ctas_resident<T, kPer>();
  const int64_t wanted = (a.num_tokens + kMultiThreads / 32 - 1) / (kMultiThreads / 32);
  const int ctas = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, resident)));
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(ctas));
  config.blockDim = dim3(kMultiThreads);
  config.stream = stream;
  cudaLaunchAttribute cooperative{};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  config.attrs = &cooperative;
  config.numAttrs = 1;
  MOELORA_CUDA_CHECK(cudaLaunchKernelEx(&config, route_multi_kernel<T, kPer>, m));
  if (own) detail::scratch_free(m.global_counts, stream);
}

// Logits per lane: the smallest power of two that holds E.
template <typename T>
void launch_route_for_experts(const RouteArgs& a, cudaStream_t stream, void* workspace) {
  static_assert(kMaxPerLane == 16, "the dispatch below covers 1..16 logits per lane");
  if (a.num_experts <= 32) return launch_route<T, 1>(a, stream, workspace);
  if (a.num_experts <= 64) return launch_route<T, 2>(a, stream, workspace);
  if (a.num_experts <= 128) return launch_route<T, 4>(a, stream, workspace);
  if (a.num_experts <= 256) return launch_route<T, 8>(a, stream, workspace);
  return launch_route<T, 16>(a, stream, workspace);
}

}  // namespace

size_t moe_route_workspace_bytes(int64_t num_tokens, int32_t num_experts) {
  return 2 * sizeof(int32_t) * static_cast<size_t>(num_experts);
}

void moe_route(const TensorRef& router_logits, int32_t top_k, MoeRouting routing,
               bool renormalize, int32_t block_m, const TensorRef& topk_ids,
               const TensorRef& topk_weights, const TensorRef& sorted_pairs,
               const TensorRef& block_expert, const TensorRef& num_blocks,
               const TensorRef& expert_counts, void* stream, const TensorRef& workspace) {
  if (top_k > kMaxTopK) {
    throw InvalidArgument("moe_route: the GPU kernel takes top_k <= " + std::to_string(kMaxTopK) +
                          ", got " + std::to_string(top_k));
  }
  RouteArgs a{};
  a.logits = router_logits.data;
  a.logits_stride = router_logits.stride[0];
  a.num_tokens = router_logits.shape[0];
  a.num_experts = static_cast<int32_t>(router_logits.shape[1]);
  a.top_k = top_k;
  a.block_m = block_m;
  a.softmax_all = routing == MoeRouting::kSoftmaxTopk;
  a.renormalize = renormalize;
  a.topk_ids = static_cast<int32_t*>(topk_ids.data);
  a.topk_weights = static_cast<float*>(topk_weights.data);
  a.sorted_pairs = static_cast<int32_t*>(sorted_pairs.data);
  a.sorted_len = sorted_pairs.shape[0];
  a.block_expert = static_cast<int32_t*>(block_expert.data);
  a.max_blocks = block_expert.shape[0];
  a.num_blocks = static_cast<int32_t*>(num_blocks.data);
  a.expert_counts = static_cast<int32_t*>(expert_counts.data);
  const cudaStream_t s = detail::as_stream(stream);
  MOELORA_DISPATCH_FLOAT(router_logits.dtype, T,
                         launch_route_for_experts<T>(a, s, workspace.data));
  detail::check_launch("moe_route");
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
