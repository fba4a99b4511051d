// CPU reference of moe_lora_align: a counting sort of the (token, k) pairs by (slot, expert).
//   counts[slot][expert] -> blocks per group (ceil(count / block_m)) -> a prefix sum gives each
//   group's first block -> pairs are placed in pair-id order, so each block lists ascending pair
//   ids. Everything past the last used entry is -1. O(P + num_slots * num_experts).
#include <string>
#include <vector>

#include "kernels/dispatch.h"
#include "kernels/validate.h"

namespace moelora::cpu {

namespace {

constexpr const char* kOp = "moe_lora_align";

const int32_t* int32_at(const TensorRef& t, int64_t i) {
  return static_cast<const int32_t*>(t.data) + i * t.stride[0];
}

int32_t* int32_out(const TensorRef& t, int64_t i) {
  return static_cast<int32_t*>(t.data) + i * t.stride[0];
}

}  // namespace

void moe_lora_align(const MoeLoraAlignArgs& a) {
  const TensorRef &topk_ids = a.topk_ids, &token_slot = a.token_slot,
                  &sorted_pairs = a.sorted_pairs, &block_slot = a.block_slot,
                  &block_expert = a.block_expert, &num_blocks = a.num_blocks;
  const int32_t num_experts = a.num_experts, num_slots = a.num_slots, block_m = a.block_m;
  const bool dense = kernels::is_absent(topk_ids);
  const int64_t num_tokens = token_slot.shape[0];
  const int64_t top_k = dense ? 1 : topk_ids.shape[1];
  const int64_t num_pairs = num_tokens * top_k;

  // Expert of every pair and the slot of every token, checked once; -1 marks base pairs.
  std::vector<int32_t> pair_group(static_cast<size_t>(num_pairs), -1);
  std::vector<int64_t> group_count(static_cast<size_t>(num_slots) * num_experts, 0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    int32_t slot = *int32_at(token_slot, t);
    if (slot < -1 || slot >= num_slots) {
      kernels::throw_invalid(kOp, "token_slot[" + std::to_string(t) + "] = " +
                                      std::to_string(slot) + " is outside [-1, num_slots = " +
                                      std::to_string(num_slots) + ")");
    }
    for (int64_t k = 0; k < top_k; ++k) {
      int32_t expert = 0;
      if (!dense) {
        expert = static_cast<const int32_t*>(
            topk_ids.data)[t * topk_ids.stride[0] + k * topk_ids.stride[1]];
        if (expert < 0 || expert >= num_experts) {
          kernels::throw_invalid(kOp, "topk_ids[" + std::to_string(t) + ", " +
                                          std::to_string(k) + "] = " + std::to_string(expert) +
                                          " is outside [0, num_experts = " +
                                          std::to_string(num_experts) + ")");
        }
      }
      if (slot < 0) continue;
      int32_t group = slot * num_experts + expert;
      pair_group[static_cast<size_t>(t * top_k + k)] = group;
      ++group_count[static_cast<size_t>(group)];
    }
  }

  // First output row of each group, in (slot, expert) order.
  std::vector<int64_t> group_next_row(group_count.size());
  int64_t blocks_used = 0;
  for (size_t group = 0; group < group_count.size(); ++group) {
    group_next_row[group] = blocks_used * block_m;
    blocks_used += (group_count[group] + block_m - 1) / block_m;
  }
  const int64_t max_blocks = block_slot.shape[0];
  if (blocks_used > max_blocks) {
    // Cannot happen when the outputs were sized by moe_lora_align_max_blocks.
    kernels::throw_invalid(kOp, "block_slot holds " + std::to_string(max_blocks) +
                                    " blocks but " + std::to_string(blocks_used) +
                                    " are needed; size outputs with moe_lora_align_max_blocks");
  }

  for (int64_t i = 0; i < sorted_pairs.shape[0]; ++i) *int32_out(sorted_pairs, i) = -1;
  for (int64_t b = 0; b < max_blocks; ++b) {
    *int32_out(block_slot, b) = -1;
    *int32_out(block_expert, b) = -1;
  }
  for (int64_t pair = 0; pair < num_pairs; ++pair) {
    int32_t group = pair_group[static_cast<size_t>(pair)];
    if (group < 0) continue;
    int64_t row = group_next_row[static_cast<size_t>(group)]++;
    *int32_out(sorted_pairs, row) = static_cast<int32_t>(pair);
    *int32_out(block_slot, row / block_m) = group / num_experts;
    *int32_out(block_expert, row / block_m) = group % num_experts;
  }
  *int32_out(num_blocks, 0) = static_cast<int32_t>(blocks_used);
}

}  // namespace moelora::cpu
