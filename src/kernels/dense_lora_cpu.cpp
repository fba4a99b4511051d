// CPU reference of dense multi-LoRA: the one-expert, unweighted case of fused_moe_lora. Row t of
// input maps to row t of output (input_pairs_per_row = 1), every block uses expert 0 of its
// slot's row table, and no routing weight scales the delta.
#include "kernels/dispatch.h"

namespace moelora::cpu {

void dense_lora(const TensorRef& input, const TensorRef& output, const TensorRef& sorted_rows,
                const TensorRef& block_slot, const TensorRef& num_blocks, int32_t block_m,
                const std::vector<LoraSiteView>& slices, const std::vector<int64_t>& col_offsets) {
  const TensorRef no_weights{};
  const TensorRef expert_zero{};  // absent block_expert: expert 0 for every block
  fused_moe_lora(input, /*input_pairs_per_row=*/1, output, no_weights, sorted_rows, block_slot,
                 expert_zero, num_blocks, block_m, slices, col_offsets, "dense_lora");
}

}  // namespace moelora::cpu
