// moe_lora_align on the GPU: builds the kernels' arguments from the validated MoeLoraAlignArgs
// and launches the form the plan names: one CTA (align/single_cta.cu), or the cooperative
// multi-CTA form (align/multi_cta.cu) for large steps, which falls back to one CTA where it does
// not apply (counters past shared memory, no cooperative launch). Why the forms and the
// threshold: docs/performance.md, "Alignment".
#include <algorithm>

#include "align/align.cuh"
#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "kernels/dispatch.h"
#include "moelora/plan.h"

namespace moelora::cuda {

size_t moe_lora_align_workspace_bytes(int64_t num_pairs, int32_t num_experts, int32_t num_slots,
                                      AlignKernel kernel) {
  const int64_t num_groups = int64_t{num_slots} * num_experts;
  const size_t single = align::single_workspace_bytes(num_groups);
  if (kernel != AlignKernel::kMultiCta) return single;
  return std::max(single, align::multi_workspace_bytes(num_pairs, num_groups));
}

void moe_lora_align(const MoeLoraAlignArgs& args, const LoraPlan& plan, void* stream) {
  align::AlignArgs a{};
  const TensorRef& topk_ids = args.topk_ids;
  const bool dense = topk_ids.data == nullptr && topk_ids.ndim == 0;
  a.topk_ids = dense ? nullptr : static_cast<const int32_t*>(topk_ids.data);
  a.topk_stride0 = dense ? 0 : topk_ids.stride[0];
  a.topk_stride1 = dense ? 0 : topk_ids.stride[1];
  a.top_k = dense ? 1 : static_cast<int32_t>(topk_ids.shape[1]);
  a.token_slot = static_cast<const int32_t*>(args.token_slot.data);
  a.slot_stride = args.token_slot.stride[0];
  a.num_tokens = args.token_slot.shape[0];
  a.num_experts = args.num_experts;
  a.num_slots = args.num_slots;
  a.block_m = args.block_m;
  a.sorted_pairs = static_cast<int32_t*>(args.sorted_pairs.data);
  a.sorted_stride = args.sorted_pairs.stride[0];
  a.sorted_len = args.sorted_pairs.shape[0];
  a.block_slot = static_cast<int32_t*>(args.block_slot.data);
  a.block_slot_stride = args.block_slot.stride[0];
  a.block_expert = static_cast<int32_t*>(args.block_expert.data);
  a.block_expert_stride = args.block_expert.stride[0];
  a.max_blocks = args.block_slot.shape[0];
  a.num_blocks = static_cast<int32_t*>(args.num_blocks.data);

  cudaStream_t s = detail::as_stream(stream);
  // The caller's workspace (sized by moe_lora_align_workspace_bytes; the public op checks it),
  // else stream-ordered scratch.
  const TensorRef& workspace = args.workspace;
  const size_t given = workspace.data != nullptr
                           ? static_cast<size_t>(workspace.numel()) * dtype_size(workspace.dtype)
                           : 0;
  if (plan.align == AlignKernel::kMultiCta &&
      align::launch_align_multi(a, s, workspace.data, given)) {
    detail::check_launch("moe_lora_align (multi-CTA)");
    return;
  }
  align::launch_align_single(a, plan.pdl, s, workspace.data, given);
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
