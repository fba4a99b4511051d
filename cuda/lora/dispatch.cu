// fused_moe_lora, fused_moe_lora_unsorted and dense_lora on the GPU: builds the kernels'
// arguments (LoraArgs) from the validated FusedMoeLoraArgs and launches the kernel family the
// plan names (lora/kernels.h): tensor-core tiles when the groups hold many rows (prefill), one
// cluster per group when they hold few (decode), split-K CUDA-core kernels for whatever the
// others decline. The unsorted form always takes the cluster kernel.
#include <algorithm>
#include <string>
#include <vector>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "kernels/dispatch.h"
#include "kernels/validate.h"
#include "lora/kernels.h"
#include "moelora/ops.h"
#include "moelora/plan.h"
#include "plan_rules.h"

namespace moelora::cuda {

using kernels::is_absent;

namespace {

LoraVectorization vectorization(const LoraArgs& a, const TensorRef& input,
                                const TensorRef& output) {
  const int64_t elem = static_cast<int64_t>(dtype_size(input.dtype));
  const int64_t vec = 16 / elem;
  LoraVectorization v{};
  v.input = detail::aligned16(input.data) && (input.stride[0] * elem) % 16 == 0 &&
            a.in_dim % vec == 0;
  v.output = detail::aligned16(output.data) && (output.stride[0] * elem) % 16 == 0;
  for (int i = 0; i < a.num_slices; ++i) {
    if (a.slices[i].out_dim % vec != 0 || a.slices[i].col_offset % vec != 0) v.output = false;
  }
  return v;
}

// The arguments every form shares; rank_stride 0 means no slot can add anything.
LoraArgs common_args(const FusedMoeLoraArgs& args) {
  const TensorRef &input = args.input, &output = args.output, &topk_weights = args.topk_weights;
  const std::vector<LoraSiteView>& slices = args.slices;
  if (slices.size() > static_cast<size_t>(kMaxSlices)) {
    throw InvalidArgument("fused_moe_lora: the CUDA kernel takes at most " +
                          std::to_string(kMaxSlices) + " slices, got " +
                          std::to_string(slices.size()));
  }
  LoraArgs a{};
  a.input = input.data;
  a.input_stride = input.stride[0];
  a.input_rows = input.shape[0];
  a.in_dim = input.shape[1];
  a.input_pairs_per_row = args.input_pairs_per_row;
  a.output = output.data;
  a.output_stride = output.stride[0];
  a.num_pairs = output.shape[0];
  a.weights = is_absent(topk_weights) ? nullptr : static_cast<const float*>(topk_weights.data);
  a.weight_stride = is_absent(topk_weights) ? 0 : topk_weights.stride[0];
  a.num_slices = static_cast<int32_t>(slices.size());
  int32_t rank_stride = 0;
  for (size_t i = 0; i < slices.size(); ++i) {
    const LoraSiteView& v = slices[i];
    SliceArgs& s = a.slices[i];
    s.arena = v.arena;
    s.row_offsets = v.row_offsets;
    s.slot_stride = v.slot_stride;
    s.ranks = v.ranks;
    s.rank_slot_stride = v.rank_slot_stride;
    s.num_slots = v.num_slots;
    s.num_experts = v.num_experts;
    s.max_rank = v.max_rank;
    s.out_dim = v.out_dim;
    s.col_offset = args.col_offsets[i];
    if (v.num_slots > 0) rank_stride = std::max(rank_stride, v.max_rank);
  }
  a.rank_stride = a.in_dim == 0 || input.shape[0] == 0 || output.shape[0] == 0 ? 0 : rank_stride;
  return a;
}

// Experts of the slice with the most (the views may differ; one expert for dense LoRA).
int32_t widest_experts(const LoraArgs& a) {
  int32_t experts = 1;
  for (int i = 0; i < a.num_slices; ++i) experts = std::max(experts, a.slices[i].num_experts);
  return experts;
}

// The slots whose groups a grouped step can fill: the step's adapters when the caller knows
// them, else every slot of the views.
int64_t step_slots(const LoraArgs& a, int64_t active_slots) {
  if (active_slots > 0) return active_slots;
  int64_t slots = 0;
  for (int i = 0; i < a.num_slices; ++i) slots = std::max<int64_t>(slots, a.slices[i].num_slots);
  return slots;
}

// The grouped form on the family the plan names for this layout; a launcher that declines (a
// shape it does not serve) hands the call to split-K, which takes anything.
void grouped_delta(const FusedMoeLoraArgs& args, const LoraPlan& plan, void* stream_ptr) {
  cudaStream_t stream = detail::as_stream(stream_ptr);
  const int64_t max_blocks = args.block_slot.shape[0];
  LoraArgs a = common_args(args);
  if (max_blocks == 0 || a.rank_stride == 0) return;
  a.sorted_pairs = static_cast<const int32_t*>(args.sorted_pairs.data);
  a.pairs_stride = args.sorted_pairs.stride[0];
  a.block_slot = static_cast<const int32_t*>(args.block_slot.data);
  a.block_slot_stride = args.block_slot.stride[0];
  const bool expert_zero = is_absent(args.block_expert);
  a.block_expert = expert_zero ? nullptr : static_cast<const int32_t*>(args.block_expert.data);
  a.block_expert_stride = expert_zero ? 0 : args.block_expert.stride[0];
  a.num_blocks = static_cast<const int32_t*>(args.num_blocks.data);
  a.block_m = args.block_m;
  const LoraVectorization vec = vectorization(a, args.input, args.output);
  // Only the grid and the splits follow the step's adapters: the kernels walk every block up to
  // the device-side count, so a wrong count changes speed, never results.
  const int64_t bound = plan_rules::launch_blocks(max_blocks, a.num_pairs, widest_experts(a),
                                                  args.active_slots, a.block_m);
  const bool aligned = vec.input && vec.output && args.input.dtype != DType::kFloat32;
  switch (aligned ? plan.kernel : plan.unaligned_kernel) {
    case LoraKernel::kMma: {
      const int64_t expected =
          plan_rules::expected_blocks(a.num_pairs, step_slots(a, args.active_slots),
                                      widest_experts(a), a.block_m, bound);
      if (launch_lora_mma(a, args.input.dtype, vec, max_blocks, bound, expected, plan, stream)) {
        return;
      }
      break;
    }
    case LoraKernel::kCluster:
      if (launch_lora_cluster(a, args.input.dtype, vec, max_blocks, bound, plan, stream)) return;
      break;
    case LoraKernel::kSplitK:
      break;
  }
  launch_lora_splitk(a, args.input.dtype, vec, max_blocks, plan, stream);
}

}  // namespace

void fused_moe_lora(const FusedMoeLoraArgs& args, const LoraPlan& plan, void* stream) {
  grouped_delta(args, plan, stream);
}

void dense_lora(const FusedMoeLoraArgs& args, const LoraPlan& plan, void* stream) {
  grouped_delta(args, plan, stream);  // block_expert absent: expert 0
}

void fused_moe_lora_unsorted(const FusedMoeLoraArgs& args, const LoraPlan& plan, void* stream) {
  LoraArgs a = common_args(args);
  if (a.rank_stride == 0) return;
  const TensorRef &topk_ids = args.topk_ids, &token_slot = args.token_slot;
  a.token_slot = static_cast<const int32_t*>(token_slot.data);
  a.token_slot_stride = token_slot.stride[0];
  a.top_k = is_absent(topk_ids) ? 1 : static_cast<int32_t>(topk_ids.shape[1]);
  if (!is_absent(topk_ids)) {
    // pair p = t * K + k; the kernel reads pair_expert[p * stride] on a contiguous [T, K] view
    if (topk_ids.stride[1] != 1 || topk_ids.stride[0] != topk_ids.shape[1]) {
      throw InvalidArgument("fused_moe_lora_unsorted: topk_ids must be contiguous, got " +
                            topk_ids.describe());
    }
    a.pair_expert = static_cast<const int32_t*>(topk_ids.data);
    a.pair_expert_stride = 1;
  }
  if (!launch_lora_cluster(a, args.input.dtype, vectorization(a, args.input, args.output),
                           a.num_pairs, a.num_pairs, plan, detail::as_stream(stream))) {
    throw InvalidArgument("fused_moe_lora_unsorted: the ranks of these slices need more shared "
                          "memory than one SM has; use moe_lora_align + fused_moe_lora");
  }
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
