// The LoRA ops of moelora/ops.h (moe_lora_align, fused_moe_lora in both forms, dense_lora):
// check the arguments once (so the CPU and CUDA paths reject the same calls), then run on the
// device of the tensors with the caller's plan, or one made for the call.
#include <algorithm>
#include <climits>
#include <limits>
#include <string>
#include <vector>

#include "kernels/dispatch.h"
#include "kernels/validate.h"
#include "moelora/error.h"
#include "moelora/ops.h"

namespace moelora {

using namespace kernels;

namespace {

// An activation matrix: 2-D float rows, strided rows allowed, contiguous last dimension.
void check_activation(const TensorRef& t, const char* op, const char* arg) {
  check_float_dtype(t, op, arg);
  check_ndim(t, 2, op, arg);
  check_last_dim_contiguous(t, op, arg);
  check_has_data(t, op, arg);
}

void check_lora_io(const FusedMoeLoraArgs& a, const TensorRef& pairs, const char* pairs_arg,
                   const char* op) {
  check_activation(a.input, op, "input");
  check_activation(a.output, op, "output");
  if (a.output.dtype != a.input.dtype) {
    throw_invalid(op, std::string("output must have input's dtype ") +
                          dtype_name(a.input.dtype) + ", got " + a.output.describe());
  }
  check_same_device(a.input, a.output, op, "input", "output");
  check_same_device(a.input, pairs, op, "input", pairs_arg);
  check_site_views(a.slices, a.col_offsets, a.input.shape[1], a.output.shape[1], a.input.dtype,
                   op);
}

// token_slot int32 [T] and, unless absent, topk_ids int32 [T, K]; returns K (1 when absent).
int64_t check_routing(const TensorRef& topk_ids, const TensorRef& token_slot, const char* op) {
  check_dtype(token_slot, DType::kInt32, op, "token_slot");
  check_ndim(token_slot, 1, op, "token_slot");
  check_has_data(token_slot, op, "token_slot");
  if (is_absent(topk_ids)) return 1;
  check_dtype(topk_ids, DType::kInt32, op, "topk_ids");
  check_ndim(topk_ids, 2, op, "topk_ids");
  check_has_data(topk_ids, op, "topk_ids");
  check_size(topk_ids, 0, token_slot.shape[0], op, "topk_ids", "one row per token of token_slot");
  check_same_device(token_slot, topk_ids, op, "token_slot", "topk_ids");
  return topk_ids.shape[1];
}

// Unless absent: float32 [num_pairs] on input's device.
void check_topk_weights(const TensorRef& topk_weights, const TensorRef& input, int64_t num_pairs,
                        const char* op) {
  if (is_absent(topk_weights)) return;
  check_dtype(topk_weights, DType::kFloat32, op, "topk_weights");
  check_ndim(topk_weights, 1, op, "topk_weights");
  check_size(topk_weights, 0, num_pairs, op, "topk_weights", "one weight per pair");
  check_has_data(topk_weights, op, "topk_weights");
  check_same_device(input, topk_weights, op, "input", "topk_weights");
}

// The sizes moe_lora_align_max_blocks and moe_lora_align_workspace_bytes are asked for.
void check_align_sizes(int64_t num_pairs, int32_t num_experts, int32_t num_slots, const char* op) {
  if (num_pairs < 0) throw_invalid(op, "num_pairs must be >= 0, got " + std::to_string(num_pairs));
  if (num_experts <= 0 || num_slots < 0) {
    throw_invalid(op, "num_experts must be positive and num_slots >= 0, got " +
                          std::to_string(num_experts) + " and " + std::to_string(num_slots));
  }
}

#ifdef MOELORA_WITH_CUDA
// The plan of one call: the caller's, or plan_lora of the call's shape on its device.
LoraPlan call_plan(const LoraPlan* given, const LoraStep& step, const TensorRef& on) {
  if (given != nullptr) return *given;
  return plan_lora(step, device_props(on.device, on.device_index));
}

LoraStep step_of(const FusedMoeLoraArgs& a, bool dense) {
  LoraStep s;
  s.num_pairs = a.output.shape[0];
  for (const LoraSiteView& v : a.slices) s.num_experts = std::max(s.num_experts, v.num_experts);
  s.num_adapters = static_cast<int32_t>(std::min<int64_t>(a.active_slots, INT32_MAX));
  s.dense = dense;
  s.dtype = a.input.dtype;
  return s;
}
#endif

// The grouped form's block metadata, the activations and the slices of fused_moe_lora and
// dense_lora.
void check_grouped(const FusedMoeLoraArgs& a, const char* pairs_arg, const char* op) {
  if (a.active_slots < 0) {
    throw_invalid(op, "active_slots must be >= 0 (0: unknown), got " +
                          std::to_string(a.active_slots));
  }
  check_block_metadata(a.sorted_pairs, a.block_slot, a.block_expert, a.num_blocks, a.block_m, op,
                       pairs_arg);
  check_lora_io(a, a.sorted_pairs, pairs_arg, op);
}

}  // namespace

int64_t moe_lora_align_max_blocks(int64_t num_pairs, int32_t num_experts, int32_t num_slots,
                                  int32_t block_m) {
  constexpr const char* op = "moe_lora_align_max_blocks";
  check_align_sizes(num_pairs, num_experts, num_slots, op);
  check_block_m(block_m, op);
  // Each non-empty (slot, expert) group wastes at most block_m - 1 rows of padding, and there
  // are at most min(num_pairs, num_slots * num_experts) of them. At least one block, so that
  // no output is ever empty.
  const int64_t groups = std::min(num_pairs, int64_t{num_slots} * num_experts);
  return std::max<int64_t>(1, (num_pairs + groups * (block_m - 1)) / block_m);
}

int64_t moe_lora_align_workspace_bytes(int64_t num_pairs, int32_t num_experts, int32_t num_slots,
                                       DeviceKind device, const LoraPlan* plan) {
  constexpr const char* op = "moe_lora_align_workspace_bytes";
  check_align_sizes(num_pairs, num_experts, num_slots, op);
  if (device != DeviceKind::kCUDA) return 0;
#ifdef MOELORA_WITH_CUDA
  LoraStep step;
  step.num_pairs = num_pairs;
  step.num_experts = num_experts;
  const AlignKernel align =
      plan != nullptr ? plan->align : plan_lora(step, device_props(DeviceKind::kCUDA, -1)).align;
  return static_cast<int64_t>(
      cuda::moe_lora_align_workspace_bytes(num_pairs, num_experts, num_slots, align));
#else
  no_cuda_kernel(op);
#endif
}

void moe_lora_align(const MoeLoraAlignArgs& a, void* stream, const LoraPlan* plan) {
  constexpr const char* op = "moe_lora_align";
  const int64_t top_k = check_routing(a.topk_ids, a.token_slot, op);
  if (is_absent(a.block_expert)) throw_invalid(op, "block_expert is required");
  check_block_metadata(a.sorted_pairs, a.block_slot, a.block_expert, a.num_blocks, a.block_m, op,
                       "sorted_pairs");
  check_same_device(a.token_slot, a.sorted_pairs, op, "token_slot", "sorted_pairs");
  const int64_t num_pairs = a.token_slot.shape[0] * top_k;
  if (num_pairs > std::numeric_limits<int32_t>::max()) {  // sorted_pairs holds int32 pair ids
    throw_invalid(op, "at most 2^31 - 1 (token, k) pairs, got " + std::to_string(num_pairs));
  }
  const int64_t max_blocks =
      moe_lora_align_max_blocks(num_pairs, a.num_experts, a.num_slots, a.block_m);
  if (a.block_slot.shape[0] < max_blocks) {
    throw_invalid(op, "block_slot must hold moe_lora_align_max_blocks = " +
                          std::to_string(max_blocks) + " blocks, got " + a.block_slot.describe());
  }
  if (!is_absent(a.workspace)) {
    check_same_device(a.token_slot, a.workspace, op, "token_slot", "workspace");
    if (!a.workspace.is_contiguous()) throw_invalid(op, "workspace must be contiguous");
  }
  if (!on_cuda(a.token_slot)) return cpu::moe_lora_align(a);
#ifdef MOELORA_WITH_CUDA
  LoraStep step;
  step.num_pairs = num_pairs;
  step.num_experts = a.num_experts;
  step.dense = is_absent(a.topk_ids);
  const LoraPlan p = call_plan(plan, step, a.token_slot);
  if (!is_absent(a.workspace)) {
    const int64_t needed = moe_lora_align_workspace_bytes(num_pairs, a.num_experts, a.num_slots,
                                                          DeviceKind::kCUDA, &p);
    const int64_t bytes = a.workspace.numel() * static_cast<int64_t>(dtype_size(a.workspace.dtype));
    if (bytes < needed) {
      throw_invalid(op, "workspace must hold moe_lora_align_workspace_bytes = " +
                            std::to_string(needed) + " bytes, got " + a.workspace.describe());
    }
  }
  cuda::moe_lora_align(a, p, stream);
#else
  no_cuda_kernel(op);
#endif
}

void fused_moe_lora(const FusedMoeLoraArgs& a, void* stream, const LoraPlan* plan) {
  constexpr const char* op = "fused_moe_lora";
  if (is_absent(a.block_expert)) throw_invalid(op, "block_expert is required");
  check_grouped(a, "sorted_pairs", op);
  if (a.input_pairs_per_row <= 0) {
    throw_invalid(op, "input_pairs_per_row must be positive, got " +
                          std::to_string(a.input_pairs_per_row));
  }
  check_size(a.output, 0, a.input.shape[0] * a.input_pairs_per_row, op, "output",
             "input rows * input_pairs_per_row");
  check_topk_weights(a.topk_weights, a.input, a.output.shape[0], op);
  if (!on_cuda(a.input)) return cpu::fused_moe_lora(a, op);
#ifdef MOELORA_WITH_CUDA
  cuda::fused_moe_lora(a, call_plan(plan, step_of(a, false), a.input), stream);
#else
  no_cuda_kernel(op);
#endif
}

void fused_moe_lora_unsorted(const FusedMoeLoraArgs& a, void* stream, const LoraPlan* plan) {
  constexpr const char* op = "fused_moe_lora_unsorted";
  const int64_t top_k = check_routing(a.topk_ids, a.token_slot, op);
  if (!is_absent(a.topk_ids) && !a.topk_ids.is_contiguous()) {
    throw_invalid(op, "topk_ids must be contiguous, got " + a.topk_ids.describe());
  }
  check_lora_io(a, a.token_slot, "token_slot", op);
  if (a.input_pairs_per_row != 1 && a.input_pairs_per_row != top_k) {
    throw_invalid(op, "input_pairs_per_row must be 1 (one input row per pair) or top_k = " +
                          std::to_string(top_k) + " (one per token), got " +
                          std::to_string(a.input_pairs_per_row));
  }
  check_size(a.output, 0, a.token_slot.shape[0] * top_k, op, "output", "tokens * top_k pairs");
  check_size(a.input, 0, a.output.shape[0] / a.input_pairs_per_row, op, "input",
             "pairs / input_pairs_per_row");
  check_topk_weights(a.topk_weights, a.input, a.output.shape[0], op);
  if (on_cuda(a.input)) {
#ifdef MOELORA_WITH_CUDA
    return cuda::fused_moe_lora_unsorted(a, call_plan(plan, step_of(a, is_absent(a.topk_ids)),
                                                      a.input),
                                         stream);
#else
    no_cuda_kernel(op);
#endif
  }
  // The CPU reference is the grouped reference on a host-side alignment: same semantics.
  MoeLoraAlignArgs align;
  align.topk_ids = a.topk_ids;
  align.token_slot = a.token_slot;
  for (const LoraSiteView& v : a.slices) {
    align.num_slots = std::max(align.num_slots, v.num_slots);
    align.num_experts = std::max(align.num_experts, v.num_experts);
  }
  align.block_m = 1;
  const int64_t pairs = a.output.shape[0];
  const int64_t max_blocks = moe_lora_align_max_blocks(pairs, align.num_experts, align.num_slots,
                                                       align.block_m);
  std::vector<int32_t> sorted(static_cast<size_t>(max_blocks)), block_slot(sorted.size()),
      block_expert(sorted.size()), count(1);
  align.sorted_pairs = make_tensor_ref(sorted.data(), DType::kInt32, {max_blocks});
  align.block_slot = make_tensor_ref(block_slot.data(), DType::kInt32, {max_blocks});
  align.block_expert = make_tensor_ref(block_expert.data(), DType::kInt32, {max_blocks});
  align.num_blocks = make_tensor_ref(count.data(), DType::kInt32, {1});
  cpu::moe_lora_align(align);
  FusedMoeLoraArgs grouped = a;
  grouped.sorted_pairs = align.sorted_pairs;
  grouped.block_slot = align.block_slot;
  grouped.block_expert = align.block_expert;
  grouped.num_blocks = align.num_blocks;
  grouped.block_m = align.block_m;
  cpu::fused_moe_lora(grouped, op);
}

void dense_lora(const FusedMoeLoraArgs& a, void* stream, const LoraPlan* plan) {
  constexpr const char* op = "dense_lora";
  if (!is_absent(a.block_expert)) throw_invalid(op, "block_expert must be absent (one expert)");
  if (!is_absent(a.topk_weights)) throw_invalid(op, "topk_weights must be absent");
  if (a.input_pairs_per_row != 1) {
    throw_invalid(op, "input_pairs_per_row must be 1 (one input row per output row), got " +
                          std::to_string(a.input_pairs_per_row));
  }
  check_grouped(a, "sorted_rows", op);
  check_size(a.output, 0, a.input.shape[0], op, "output", "one row per input row");
  if (!on_cuda(a.input)) return cpu::fused_moe_lora(a, op);
#ifdef MOELORA_WITH_CUDA
  cuda::dense_lora(a, call_plan(plan, step_of(a, true), a.input), stream);
#else
  no_cuda_kernel(op);
#endif
}

}  // namespace moelora
