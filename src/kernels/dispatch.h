// Internal: the per-device implementations behind the public ops of moelora/ops.h.
//
// ops.cpp validates the arguments once, then calls cpu::<op> for host tensors or cuda::<op> (a
// CUDA build; the launchers in cuda/) for device tensors, handing down the same argument struct
// the binding built. The CUDA side also receives the call's plan; the CPU reference has one
// semantics and needs none.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moelora/ops.h"
#include "moelora/plan.h"

namespace moelora {

namespace cpu {

void moe_lora_align(const MoeLoraAlignArgs& args);

// Shared by fused_moe_lora and dense_lora: block_expert and topk_weights may be absent (expert
// 0, weight 1). `op` names the public op in error messages.
void fused_moe_lora(const FusedMoeLoraArgs& args, const char* op);

void kv_cache_write(const TensorRef& key, const TensorRef& value, const TensorRef& slot_mapping,
                    const KvCacheView& cache);

void paged_attention(const PagedAttentionArgs& args);

}  // namespace cpu

#ifdef MOELORA_WITH_CUDA
namespace cuda {

size_t moe_lora_align_workspace_bytes(int64_t num_pairs, int32_t num_experts, int32_t num_slots,
                                      AlignKernel align);
void moe_lora_align(const MoeLoraAlignArgs& args, const LoraPlan& plan, void* stream);
void fused_moe_lora(const FusedMoeLoraArgs& args, const LoraPlan& plan, void* stream);
void fused_moe_lora_unsorted(const FusedMoeLoraArgs& args, const LoraPlan& plan, void* stream);
void dense_lora(const FusedMoeLoraArgs& args, const LoraPlan& plan, void* stream);
void kv_cache_write(const TensorRef& key, const TensorRef& value, const TensorRef& slot_mapping,
                    const KvCacheView& cache, void* stream);
void paged_attention(const PagedAttentionArgs& args, const AttentionPlan& plan, void* stream);

}  // namespace cuda
#endif

}  // namespace moelora
