// moe_lora_align on the GPU: a counting sort of the (token, k) pairs by (slot, expert) group in
// one CTA of 1024 threads, with fixed-size outputs and no host sync (graph-capturable).
//   1. fill the outputs with -1 and zero the per-group counters;
//   2. count pairs per group (shared-memory atomics when the counters fit, else global);
//   3. blocks per group = ceil(count / block_m), exclusive scan over groups (block-wide scan of
//      per-thread partial sums), write block_slot / block_expert, turn each counter into the
//      group's first output row, write num_blocks;
//   4. scatter: each pair takes the next row of its group with an atomic increment.
// Within a group the order of pair ids is the order the atomics resolve (not the CPU's ascending
// order); the set of pairs of every block, and every per-row result downstream, is the same.
// Pairs with slot -1 (base model) are left out; out-of-range slot or expert ids are skipped too
// (the GPU cannot throw; the CPU reference reports them).
// Cost: O(P / 8192 + G / 1024) memory latencies of one CTA (each thread loads 8 pairs' ids
// before its atomics); at decode (a few pairs) it is launch-bound.
#include "common.cuh"
#include "kernels/dispatch.h"

namespace moelora::cuda {

namespace {

constexpr int kAlignThreads = 1024;
constexpr int kMaxSmemGroups = 40 * 1024;  // 160 KB of shared counters at most
constexpr int kPairsPerStep = 8;           // pairs a thread loads before counting / placing any

struct AlignArgs {
  const int32_t* topk_ids;  // [T, K] strides (topk_stride0, topk_stride1); null = dense
  int64_t topk_stride0, topk_stride1;
  const int32_t* token_slot;  // [T] stride slot_stride
  int64_t slot_stride;
  int64_t num_tokens;
  int32_t top_k;
  int32_t num_experts, num_slots, block_m;
  int32_t* sorted_pairs;  // [sorted_len] stride sorted_stride, pad = -1
  int64_t sorted_stride, sorted_len;
  int32_t* block_slot;  // [max_blocks] stride block_slot_stride
  int64_t block_slot_stride;
  int32_t* block_expert;  // [max_blocks] stride block_expert_stride
  int64_t block_expert_stride;
  int64_t max_blocks;
  int32_t* num_blocks;     // [1]
  int32_t* global_counts;  // [G] when the counters do not fit in shared memory, else null
};

// Group of pair p, or -1 when the pair is skipped. 32-bit division: pair ids are int32 (the
// host checks), and a 64-bit one is a ~100-instruction subroutine, which made this kernel
// instruction-bound (76 us at 32768 pairs on the H200, ncu).
__device__ __forceinline__ int32_t pair_group(const AlignArgs& a, uint32_t p) {
  const uint32_t t = p / static_cast<uint32_t>(a.top_k);
  const uint32_t k = p - t * static_cast<uint32_t>(a.top_k);
  const int32_t slot = a.token_slot[int64_t{t} * a.slot_stride];
  if (slot < 0 || slot >= a.num_slots) return -1;
  int32_t expert = 0;
  if (a.topk_ids != nullptr) {
    expert = a.topk_ids[int64_t{t} * a.topk_stride0 + int64_t{k} * a.topk_stride1];
    if (expert < 0 || expert >= a.num_experts) return -1;
  }
  return slot * a.num_experts + expert;
}

// Groups of pairs base + u * blockDim.x (u < kPairsPerStep; -1 past num_pairs): the loads of all
// of them are issued before any atomic uses one, so a pass over the pairs costs P / (1024 * 8)
// memory latencies instead of P / 1024.
__device__ __forceinline__ void pair_groups(const AlignArgs& a, int64_t base, int64_t num_pairs,
                                            int32_t (&g)[kPairsPerStep]) {
#pragma unroll
  for (int u = 0; u < kPairsPerStep; ++u) {
    const int64_t p = base + int64_t{u} * blockDim.x;
    g[u] = p < num_pairs ? pair_group(a, static_cast<uint32_t>(p)) : -1;
  }
}

// Exclusive scan of one value per thread over the CTA; returns the prefix, sets *total.
__device__ int64_t block_exclusive_scan(int64_t value, int64_t* warp_sums, int64_t* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int64_t inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int64_t other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x >> 5;
    int64_t w = lane < num_warps ? warp_sums[lane] : 0;
    int64_t w_inclusive = w;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int64_t other = __shfl_up_sync(0xffffffffu, w_inclusive, offset);
      if (lane >= offset) w_inclusive += other;
    }
    if (lane < num_warps) warp_sums[lane] = w_inclusive - w;
    if (lane == 31) *total = w_inclusive;
  }
  __syncthreads();
  return warp_sums[warp] + inclusive - value;
}

__global__ void __launch_bounds__(kAlignThreads) moe_lora_align_kernel(AlignArgs a) {
  extern __shared__ int32_t smem_counts[];
  __shared__ int64_t warp_sums[32];
  __shared__ int64_t total_blocks;
  int32_t* counts = a.global_counts != nullptr ? a.global_counts : smem_counts;
  const int64_t num_groups = int64_t{a.num_slots} * a.num_experts;
  const int64_t num_pairs = a.num_tokens * a.top_k;

  for (int64_t g = threadIdx.x; g < num_groups; g += blockDim.x) counts[g] = 0;
  for (int64_t i = threadIdx.x; i < a.sorted_len; i += blockDim.x) {
    a.sorted_pairs[i * a.sorted_stride] = -1;
  }
  for (int64_t b = threadIdx.x; b < a.max_blocks; b += blockDim.x) {
    a.block_slot[b * a.block_slot_stride] = -1;
    a.block_expert[b * a.block_expert_stride] = -1;
  }
  __syncthreads();

  const int64_t stride = int64_t{blockDim.x} * kPairsPerStep;
  for (int64_t base = threadIdx.x; base < num_pairs; base += stride) {
    int32_t g[kPairsPerStep];
    pair_groups(a, base, num_pairs, g);
#pragma unroll
    for (int u = 0; u < kPairsPerStep; ++u) {
      if (g[u] >= 0) atomicAdd(&counts[g[u]], 1);
    }
  }
  __syncthreads();

  // Each thread owns a contiguous run of groups, so the scan keeps (slot, expert) order.
  const int64_t per_thread = (num_groups + blockDim.x - 1) / blockDim.x;
  const int64_t g_begin = detail::min64(num_groups, threadIdx.x * per_thread);
  const int64_t g_end = detail::min64(num_groups, g_begin + per_thread);
  int64_t my_blocks = 0;
  for (int64_t g = g_begin; g < g_end; ++g) my_blocks += (counts[g] + a.block_m - 1) / a.block_m;
  int64_t block = block_exclusive_scan(my_blocks, warp_sums, &total_blocks);
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t n = (counts[g] + a.block_m - 1) / a.block_m;
    for (int64_t j = 0; j < n && block + j < a.max_blocks; ++j) {
      a.block_slot[(block + j) * a.block_slot_stride] = static_cast<int32_t>(g / a.num_experts);
      a.block_expert[(block + j) * a.block_expert_stride] = static_cast<int32_t>(g % a.num_experts);
    }
    counts[g] = static_cast<int32_t>(block * a.block_m);  // now the group's next output row
    block += n;
  }
  if (threadIdx.x == 0) {
    *a.num_blocks = static_cast<int32_t>(detail::min64(total_blocks, a.max_blocks));
  }
  __syncthreads();

  for (int64_t base = threadIdx.x; base < num_pairs; base += stride) {
    int32_t g[kPairsPerStep];
    pair_groups(a, base, num_pairs, g);
    int64_t row[kPairsPerStep];
#pragma unroll
    for (int u = 0; u < kPairsPerStep; ++u) row[u] = g[u] >= 0 ? atomicAdd(&counts[g[u]], 1) : -1;
#pragma unroll
    for (int u = 0; u < kPairsPerStep; ++u) {
      if (row[u] >= 0 && row[u] < a.sorted_len) {
        a.sorted_pairs[row[u] * a.sorted_stride] = static_cast<int32_t>(base + u * blockDim.x);
      }
    }
  }
}

}  // namespace

void moe_lora_align(const TensorRef& topk_ids, const TensorRef& token_slot, int32_t num_experts,
                    int32_t num_slots, int32_t block_m, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, void* stream) {
  AlignArgs a{};
  const bool dense = topk_ids.data == nullptr && topk_ids.ndim == 0;
  a.topk_ids = dense ? nullptr : static_cast<const int32_t*>(topk_ids.data);
  a.topk_stride0 = dense ? 0 : topk_ids.stride[0];
  a.topk_stride1 = dense ? 0 : topk_ids.stride[1];
  a.top_k = dense ? 1 : static_cast<int32_t>(topk_ids.shape[1]);
  a.token_slot = static_cast<const int32_t*>(token_slot.data);
  a.slot_stride = token_slot.stride[0];
  a.num_tokens = token_slot.shape[0];
  a.num_experts = num_experts;
  a.num_slots = num_slots;
  a.block_m = block_m;
  a.sorted_pairs = static_cast<int32_t*>(sorted_pairs.data);
  a.sorted_stride = sorted_pairs.stride[0];
  a.sorted_len = sorted_pairs.shape[0];
  a.block_slot = static_cast<int32_t*>(block_slot.data);
  a.block_slot_stride = block_slot.stride[0];
  a.block_expert = static_cast<int32_t*>(block_expert.data);
  a.block_expert_stride = block_expert.stride[0];
  a.max_blocks = block_slot.shape[0];
  a.num_blocks = static_cast<int32_t*>(num_blocks.data);

  cudaStream_t s = detail::as_stream(stream);
  const int64_t num_groups = int64_t{num_slots} * num_experts;
  size_t smem = 0;
  int32_t* workspace = nullptr;
  if (num_groups <= kMaxSmemGroups) {
    smem = static_cast<size_t>(detail::max64(num_groups, 1)) * sizeof(int32_t);
    if (smem > 48 * 1024) {
      MOELORA_CUDA_CHECK(cudaFuncSetAttribute(
          moe_lora_align_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
          static_cast<int>(kMaxSmemGroups * sizeof(int32_t))));
    }
  } else {
    MOELORA_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&workspace),
                                       num_groups * sizeof(int32_t), s));
    a.global_counts = workspace;
  }
  moe_lora_align_kernel<<<1, kAlignThreads, smem, s>>>(a);
  detail::check_launch("moe_lora_align");
  if (workspace != nullptr) MOELORA_CUDA_CHECK(cudaFreeAsync(workspace, s));
}

}  // namespace moelora::cuda
