// The arguments every fused_moe_lora / dense_lora kernel in cuda/ receives, and the device
// helpers they share to find a block's adapter rows. Built once per call by lora/dispatch.cu
// from validated TensorRefs; passed to kernels by value (a few hundred bytes of constant bank).
//
// Work comes in one of two forms:
//   grouped  (sorted_pairs != null): blocks of block_m pair ids sharing one (slot, expert),
//            produced by moe_lora_align; num_blocks lives on the device.
//   unsorted (sorted_pairs == null): one work item per pair p, slot = token_slot[p / top_k],
//            expert = pair_expert[p] (or 0 when pair_expert is null); no alignment pass at all,
//            used at decode where groups hold about one pair each.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/common.cuh"

namespace moelora::cuda {

constexpr int kMaxSlices = 4;

struct SliceArgs {
  const std::byte* arena;
  const int64_t* row_offsets;  // [num_slots][num_experts][2][max_rank] bytes, slot_stride apart
  int64_t slot_stride;
  const int32_t* ranks;  // ranks[slot * rank_slot_stride]
  int64_t rank_slot_stride;
  int32_t num_slots, num_experts, max_rank;
  int64_t out_dim;
  int64_t col_offset;
};

struct LoraArgs {
  const void* input;  // [input_rows, in_dim] row stride input_stride
  int64_t input_stride, input_rows, in_dim;
  int32_t input_pairs_per_row;
  void* output;  // [num_pairs, width] row stride output_stride
  int64_t output_stride, num_pairs;
  const float* weights;  // [num_pairs] stride weight_stride, or null (w = 1)
  int64_t weight_stride;
  // grouped form
  const int32_t* sorted_pairs;  // [max_blocks * block_m] stride pairs_stride, pad = -1
  int64_t pairs_stride;
  const int32_t* block_slot;  // [max_blocks]
  int64_t block_slot_stride;
  const int32_t* block_expert;  // [max_blocks], or null (expert 0: dense LoRA)
  int64_t block_expert_stride;
  const int32_t* num_blocks;  // [1]
  int32_t block_m;
  // unsorted form
  const int32_t* pair_expert;  // [num_pairs] stride pair_expert_stride, or null (expert 0)
  int64_t pair_expert_stride;
  const int32_t* token_slot;  // [num_pairs / top_k] stride token_slot_stride
  int64_t token_slot_stride;
  int32_t top_k;

  int32_t num_slices;
  SliceArgs slices[kMaxSlices];
  int32_t rank_stride;  // max over slices of max_rank
  // split-K kernels only (lora/fallback.cu): their fp32 workspace and its shape
  float* partials;  // [num_slices][splits][rows_total][rank_stride]
  int32_t splits;
  int64_t chunk;       // in_dim elements per split
  int64_t rows_total;  // max_blocks * block_m
};

// Slot, expert and rank of a work item for slice i; rank 0 when it has nothing to do.
struct BlockInfo {
  int32_t slot, expert, rank;
};

__device__ __forceinline__ BlockInfo slice_info(const SliceArgs& s, int32_t slot, int32_t expert) {
  BlockInfo info{slot, expert, 0};
  if (slot < 0 || slot >= s.num_slots || expert < 0 || expert >= s.num_experts) return info;
  const int32_t rank = s.ranks[slot * s.rank_slot_stride];
  info.rank = rank < 0 ? 0 : min(rank, s.max_rank);
  return info;
}

// Grouped form: block b (b < *num_blocks is the caller's check or done here).
__device__ __forceinline__ BlockInfo block_info(const LoraArgs& a, int64_t b, const SliceArgs& s) {
  if (b >= *a.num_blocks) return BlockInfo{-1, 0, 0};
  const int32_t slot = a.block_slot[b * a.block_slot_stride];
  const int32_t expert = a.block_expert != nullptr ? a.block_expert[b * a.block_expert_stride] : 0;
  return slice_info(s, slot, expert);
}

__device__ __forceinline__ const std::byte* lora_row(const SliceArgs& s, const BlockInfo& info,
                                                     bool is_b, int k) {
  return s.arena + s.row_offsets[info.slot * s.slot_stride +
                                 (int64_t{info.expert} * 2 + (is_b ? 1 : 0)) * s.max_rank + k];
}

__device__ __forceinline__ bool pair_valid(const LoraArgs& a, int32_t pair) {
  return pair >= 0 && pair < a.num_pairs && pair / a.input_pairs_per_row < a.input_rows;
}

// Valid pair ids of block b, packed to the front of pair_ids[block_m]; returns their count.
// Called by every thread of the CTA (warp 0 does the work); ends with a barrier.
__device__ __forceinline__ int compact_block_pairs(const LoraArgs& a, int64_t b,
                                                   int32_t* pair_ids) {
  __shared__ int count;
  if (threadIdx.x < 32) {
    int n = 0;
    for (int base = 0; base < a.block_m; base += 32) {
      const int j = base + static_cast<int>(threadIdx.x);
      int32_t pair = -1;
      if (j < a.block_m) pair = a.sorted_pairs[(b * a.block_m + j) * a.pairs_stride];
      const bool valid = pair_valid(a, pair);
      const unsigned mask = __ballot_sync(0xffffffffu, valid);
      if (valid) pair_ids[n + __popc(mask & ((1u << threadIdx.x) - 1u))] = pair;
      n += __popc(mask);
    }
    if (threadIdx.x == 0) count = n;
  }
  __syncthreads();
  return count;
}

}  // namespace moelora::cuda
