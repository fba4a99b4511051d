// paged_attention on the GPU: builds the kernels' arguments from the validated
// PagedAttentionArgs and walks the chain of kernels from the one the plan names: the
// tensor-core GQA kernel (attention/mma.cu), the CUDA-core GQA kernel (attention/gqa.cu), the
// per-head kernel (attention/per_head.cu). A kernel serves the call when its shape fits
// (plan_rules::attention_kernel_fits) and the arena is 16-byte aligned; otherwise the next one
// does. Split-KV (a cluster of CTAs per query) follows plan_rules::attention_splits. Why this
// order and these splits: docs/performance.md, "Attention kernels" and "Split-KV".
#include "attention/attention.cuh"
#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "kernels/dispatch.h"
#include "moelora/plan.h"
#include "plan_rules.h"

namespace moelora::cuda {

namespace {

AttnArgs attention_args(const PagedAttentionArgs& args, const AttentionPlan& plan) {
  AttnArgs a{};
  a.out = args.out.data;
  a.out_s0 = args.out.stride[0];
  a.out_s1 = args.out.stride[1];
  a.query = args.query.data;
  a.query_s0 = args.query.stride[0];
  a.query_s1 = args.query.stride[1];
  a.query_seq = static_cast<const int32_t*>(args.query_seq.data);
  a.query_seq_stride = args.query_seq.stride[0];
  a.query_pos = static_cast<const int32_t*>(args.query_pos.data);
  a.query_pos_stride = args.query_pos.stride[0];
  a.block_table = static_cast<const int32_t*>(args.block_table.data);
  a.bt_s0 = args.block_table.stride[0];
  a.bt_s1 = args.block_table.stride[1];
  a.max_blocks_per_seq = args.block_table.shape[1];
  a.seq_lens = static_cast<const int32_t*>(args.seq_lens.data);
  a.seq_lens_stride = args.seq_lens.stride[0];
  a.num_seqs = args.seq_lens.shape[0];
  const bool has_sinks = !(args.sinks.data == nullptr && args.sinks.ndim == 0);
  a.sinks = has_sinks ? static_cast<const float*>(args.sinks.data) : nullptr;
  a.sinks_stride = has_sinks ? args.sinks.stride[0] : 0;
  a.scale = args.scale;
  a.sliding_window = args.sliding_window;
  a.num_heads = static_cast<int32_t>(args.query.shape[1]);
  a.min_keys_per_split = plan.splits > 0 ? 0 : plan_rules::kMinKeysPerSplit;
  a.kv = kv_layout(args.cache);
  return a;
}

}  // namespace

void paged_attention(const PagedAttentionArgs& args, const AttentionPlan& plan, void* stream) {
  const int64_t num_tokens = args.query.shape[0];
  if (num_tokens == 0) return;
  const AttnArgs a = attention_args(args, plan);
  const DeviceProps device = device_props(DeviceKind::kCUDA, -1);
  AttentionStep step;
  step.num_heads = a.num_heads;
  step.num_kv_heads = args.cache.num_kv_heads;
  step.head_dim = args.cache.head_dim;
  step.page_bytes = args.cache.page_bytes;
  step.max_context = a.max_blocks_per_seq * int64_t{args.cache.block_tokens};
  step.dtype = args.cache.dtype;
  const bool aligned = detail::aligned16(a.kv.arena);
  const DType dtype = args.cache.dtype;
  cudaStream_t s = detail::as_stream(stream);
  const auto serves = [&](AttentionKernel kernel) {
    return plan.kernel <= kernel && aligned &&
           plan_rules::attention_kernel_fits(kernel, step, device);
  };
  if (serves(AttentionKernel::kMma)) {
    launch_paged_attention_mma(a, dtype, num_tokens, plan, s);
    detail::check_launch("paged_attention mma");
    return;
  }
  if (serves(AttentionKernel::kGqa)) {
    launch_paged_attention_gqa(a, dtype, num_tokens, plan, s);
    detail::check_launch("paged_attention gqa");
    return;
  }
  const int splits = plan_rules::attention_splits(num_tokens * a.num_heads, step.max_context,
                                                  /*resident_ctas=*/0, plan, device);
  launch_paged_attention_per_head(a, dtype, num_tokens, splits, s);
  detail::check_launch("paged_attention");
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
