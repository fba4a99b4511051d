// Internal: the per-device implementations behind the public ops of moelora/ops.h.
//
// ops.cpp validates the arguments once, then calls cpu::<op> for host tensors or cuda::<op> for
// device tensors. A CUDA kernel joins the dispatch by defining its launcher in cuda/ and
// setting its MOELORA_CUDA_HAS_<OP> macro below to 1; until then ops.cpp rejects CUDA tensors
// with "<op>: no CUDA kernel in this build yet". The launchers take already validated
// arguments and the stream (a cudaStream_t).
#pragma once

#include <cstdint>
#include <vector>

#include "moelora/ops.h"

// Flip to 1 when the matching launcher exists in cuda/ (CUDA builds only).
#define MOELORA_CUDA_HAS_MOE_LORA_ALIGN 1
#define MOELORA_CUDA_HAS_FUSED_MOE_LORA 1
#define MOELORA_CUDA_HAS_DENSE_LORA 1
#define MOELORA_CUDA_HAS_KV_CACHE_WRITE 1
#define MOELORA_CUDA_HAS_PAGED_ATTENTION 1

namespace moelora {

namespace cpu {

void moe_lora_align(const TensorRef& topk_ids, const TensorRef& token_slot, int32_t num_experts,
                    int32_t num_slots, int32_t block_m, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks);

// Shared by fused_moe_lora and dense_lora: block_expert and topk_weights may be absent
// (expert 0, weight 1). `op` names the public op in error messages.
void fused_moe_lora(const TensorRef& input, int32_t input_pairs_per_row, const TensorRef& output,
                    const TensorRef& topk_weights, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, int32_t block_m,
                    const std::vector<LoraSiteView>& slices,
                    const std::vector<int64_t>& col_offsets, const char* op = "fused_moe_lora");

void dense_lora(const TensorRef& input, const TensorRef& output, const TensorRef& sorted_rows,
                const TensorRef& block_slot, const TensorRef& num_blocks, int32_t block_m,
                const std::vector<LoraSiteView>& slices, const std::vector<int64_t>& col_offsets);

void kv_cache_write(const TensorRef& key, const TensorRef& value, const TensorRef& slot_mapping,
                    const KvCacheView& cache);

void paged_attention(const TensorRef& out, const TensorRef& query, const TensorRef& query_seq,
                     const TensorRef& query_pos, const TensorRef& block_table,
                     const TensorRef& seq_lens, const KvCacheView& cache, float scale,
                     int32_t sliding_window, const TensorRef& sinks);

}  // namespace cpu

#ifdef MOELORA_WITH_CUDA
namespace cuda {

size_t moe_lora_align_workspace_bytes(int64_t num_pairs, int32_t num_experts, int32_t num_slots);
void moe_lora_align(const TensorRef& topk_ids, const TensorRef& token_slot, int32_t num_experts,
                    int32_t num_slots, int32_t block_m, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, void* stream, const TensorRef& workspace);
void fused_moe_lora(const TensorRef& input, int32_t input_pairs_per_row, const TensorRef& output,
                    const TensorRef& topk_weights, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, int32_t block_m,
                    const std::vector<LoraSiteView>& slices,
                    const std::vector<int64_t>& col_offsets, void* stream, int64_t active_slots);
void dense_lora(const TensorRef& input, const TensorRef& output, const TensorRef& sorted_rows,
                const TensorRef& block_slot, const TensorRef& num_blocks, int32_t block_m,
                const std::vector<LoraSiteView>& slices, const std::vector<int64_t>& col_offsets,
                void* stream);
void fused_moe_lora_unsorted(const TensorRef& input, int32_t input_pairs_per_row,
                             const TensorRef& output, const TensorRef& topk_weights,
                             const TensorRef& topk_ids, const TensorRef& token_slot,
                             const std::vector<LoraSiteView>& slices,
                             const std::vector<int64_t>& col_offsets, void* stream);
void kv_cache_write(const TensorRef& key, const TensorRef& value, const TensorRef& slot_mapping,
                    const KvCacheView& cache, void* stream);
void paged_attention(const TensorRef& out, const TensorRef& query, const TensorRef& query_seq,
                     const TensorRef& query_pos, const TensorRef& block_table,
                     const TensorRef& seq_lens, const KvCacheView& cache, float scale,
                     int32_t sliding_window, const TensorRef& sinks, void* stream);

}  // namespace cuda
#endif

}  // namespace moelora
