// What the two GPU forms of moe_lora_align share (align/single_cta.cu: one CTA; align/
// multi_cta.cu: several CTAs for large steps; align/dispatch.cu picks one): the arguments, a
// pair's (slot, expert) group, the CTA-wide scan, the assignment of blocks to groups, and the
// two launchers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/common.cuh"

namespace moelora::cuda::align {

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
// host checks), and a 64-bit one is a ~100-instruction subroutine that makes the kernel
// instruction-bound.
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
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t value, int64_t* warp_sums,
                                                        int64_t* total) {
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

// Sets every output row and block to -1 (padding); threads `first`, first + stride, ... of the
// launch share the work.
__device__ __forceinline__ void fill_outputs(const AlignArgs& a, int64_t first, int64_t stride) {
  for (int64_t i = first; i < a.sorted_len; i += stride) a.sorted_pairs[i * a.sorted_stride] = -1;
  for (int64_t b = first; b < a.max_blocks; b += stride) {
    a.block_slot[b * a.block_slot_stride] = -1;
    a.block_expert[b * a.block_expert_stride] = -1;
  }
}

// Counts pairs [begin, end) into counts[group] (the CTA's threads share them).
__device__ __forceinline__ void count_pairs(const AlignArgs& a, int64_t begin, int64_t end,
                                            int32_t* counts) {
  for (int64_t base = begin + threadIdx.x; base < end;
       base += int64_t{blockDim.x} * kPairsPerStep) {
    int32_t g[kPairsPerStep];
    pair_groups(a, base, end, g);
#pragma unroll
    for (int u = 0; u < kPairsPerStep; ++u) {
      if (g[u] >= 0) atomicAdd(&counts[g[u]], 1);
    }
  }
}

// Places pairs [begin, end): each takes row next_row[group]++ of sorted_pairs (rows past its
// end are dropped, as blocks past max_blocks are).
__device__ __forceinline__ void place_pairs(const AlignArgs& a, int64_t begin, int64_t end,
                                            int32_t* next_row) {
  for (int64_t base = begin + threadIdx.x; base < end;
       base += int64_t{blockDim.x} * kPairsPerStep) {
    int32_t g[kPairsPerStep];
    pair_groups(a, base, end, g);
    int64_t row[kPairsPerStep];
#pragma unroll
    for (int u = 0; u < kPairsPerStep; ++u) row[u] = g[u] >= 0 ? atomicAdd(&next_row[g[u]], 1) : -1;
#pragma unroll
    for (int u = 0; u < kPairsPerStep; ++u) {
      if (row[u] >= 0 && row[u] < a.sorted_len) {
        a.sorted_pairs[row[u] * a.sorted_stride] = static_cast<int32_t>(base + u * blockDim.x);
      }
    }
  }
}

// Blocks of every group, in (slot, expert) order: each thread owns a contiguous run of groups,
// count(g) gives a group's pairs; hands each group's first output row to first_row(g, row) and,
// when write_blocks, writes block_slot / block_expert (up to max_blocks) and num_blocks (the
// multi-CTA form has every CTA compute the same assignment and one of them write it).
// CTA-wide: every thread of the CTA calls it; ends with a barrier.
template <typename Count, typename FirstRow>
__device__ __forceinline__ void assign_blocks(const AlignArgs& a, Count&& count,
                                              FirstRow&& first_row, bool write_blocks = true) {
  __shared__ int64_t warp_sums[32];
  __shared__ int64_t total_blocks;
  const int64_t num_groups = int64_t{a.num_slots} * a.num_experts;
  const int64_t per_thread = (num_groups + blockDim.x - 1) / blockDim.x;
  const int64_t g_begin = detail::min64(num_groups, threadIdx.x * per_thread);
  const int64_t g_end = detail::min64(num_groups, g_begin + per_thread);
  int64_t my_blocks = 0;
  for (int64_t g = g_begin; g < g_end; ++g) my_blocks += (count(g) + a.block_m - 1) / a.block_m;
  int64_t block = block_exclusive_scan(my_blocks, warp_sums, &total_blocks);
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t n = (count(g) + a.block_m - 1) / a.block_m;
    for (int64_t j = 0; write_blocks && j < n && block + j < a.max_blocks; ++j) {
      a.block_slot[(block + j) * a.block_slot_stride] = static_cast<int32_t>(g / a.num_experts);
      a.block_expert[(block + j) * a.block_expert_stride] = static_cast<int32_t>(g % a.num_experts);
    }
    first_row(g, block * a.block_m);
    block += n;
  }
  if (write_blocks && threadIdx.x == 0) {
    *a.num_blocks = static_cast<int32_t>(detail::min64(total_blocks, a.max_blocks));
  }
  __syncthreads();
}

// The one-CTA form (align/single_cta.cu), launched with PDL when `pdl`. Its counters live in
// shared memory when the groups fit (kMaxSmemGroups), else in `workspace` when it holds
// single_workspace_bytes, else in stream-ordered scratch.
void launch_align_single(AlignArgs a, bool pdl, cudaStream_t stream, void* workspace,
                         size_t workspace_bytes);
// Bytes of global counters the one-CTA form needs (its groups past shared memory's).
size_t single_workspace_bytes(int64_t num_groups);

// The multi-CTA form (align/multi_cta.cu): returns false, launching nothing, when the
// groups' counters do not fit in shared memory or the device has no cooperative launch (the
// one-CTA form then takes the call). Its counters live in `workspace` when it holds
// multi_workspace_bytes, else in stream-ordered scratch.
bool launch_align_multi(const AlignArgs& a, cudaStream_t stream, void* workspace,
                        size_t workspace_bytes);
// Bytes of counters the multi-CTA form needs for num_pairs pairs in num_groups groups on the
// current device; 0 when it would decline.
size_t multi_workspace_bytes(int64_t num_pairs, int64_t num_groups);

}  // namespace moelora::cuda::align
