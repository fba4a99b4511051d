// The public ops of moelora/ops.h: check the arguments once (so the CPU and CUDA paths reject
// the same calls), then run on the device of the tensors.
#include "moelora/ops.h"

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "kernels/dispatch.h"
#include "kernels/validate.h"
#include "moelora/error.h"

namespace moelora {

using namespace kernels;

namespace {

[[noreturn, maybe_unused]] void no_cuda_kernel(const char* op) {
  throw InvalidArgument(std::string(op) + ": no CUDA kernel in this build yet");
}

bool on_cuda(const TensorRef& t) { return t.device == DeviceKind::kCUDA; }

// An activation matrix: 2-D float rows, strided rows allowed, contiguous last dimension.
void check_activation(const TensorRef& t, const char* op, const char* arg) {
  check_float_dtype(t, op, arg);
  check_ndim(t, 2, op, arg);
  check_last_dim_contiguous(t, op, arg);
  check_has_data(t, op, arg);
}

void check_lora_io(const TensorRef& input, const TensorRef& output, const TensorRef& pairs,
                   const char* pairs_arg, const std::vector<LoraSiteView>& slices,
                   const std::vector<int64_t>& col_offsets, const char* op) {
  check_activation(input, op, "input");
  check_activation(output, op, "output");
  if (output.dtype != input.dtype) {
    throw_invalid(op, std::string("output must have input's dtype ") + dtype_name(input.dtype) +
                          ", got " + output.describe());
  }
  check_same_device(input, output, op, "input", "output");
  check_same_device(input, pairs, op, "input", pairs_arg);
  check_site_views(slices, col_offsets, input.shape[1], output.shape[1], input.dtype, op);
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
                                       DeviceKind device) {
  constexpr const char* op = "moe_lora_align_workspace_bytes";
  check_align_sizes(num_pairs, num_experts, num_slots, op);
  if (device != DeviceKind::kCUDA) return 0;
#if defined(MOELORA_WITH_CUDA) && MOELORA_CUDA_HAS_MOE_LORA_ALIGN
  return static_cast<int64_t>(cuda::moe_lora_align_workspace_bytes(num_pairs, num_experts,
                                                                   num_slots));
#else
  no_cuda_kernel(op);
#endif
}

void moe_lora_align(const TensorRef& topk_ids, const TensorRef& token_slot, int32_t num_experts,
                    int32_t num_slots, int32_t block_m, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, void* stream, const TensorRef& workspace) {
  constexpr const char* op = "moe_lora_align";
  const int64_t top_k = check_routing(topk_ids, token_slot, op);
  if (is_absent(block_expert)) throw_invalid(op, "block_expert is required");
  check_block_metadata(sorted_pairs, block_slot, block_expert, num_blocks, block_m, op,
                       "sorted_pairs");
  check_same_device(token_slot, sorted_pairs, op, "token_slot", "sorted_pairs");
  const int64_t num_pairs = token_slot.shape[0] * top_k;
  if (num_pairs > std::numeric_limits<int32_t>::max()) {  // sorted_pairs holds int32 pair ids
    throw_invalid(op, "at most 2^31 - 1 (token, k) pairs, got " + std::to_string(num_pairs));
  }
  const int64_t max_blocks = moe_lora_align_max_blocks(num_pairs, num_experts, num_slots, block_m);
  if (block_slot.shape[0] < max_blocks) {
    throw_invalid(op, "block_slot must hold moe_lora_align_max_blocks = " +
                          std::to_string(max_blocks) + " blocks, got " + block_slot.describe());
  }
  if (!is_absent(workspace)) {
    check_same_device(token_slot, workspace, op, "token_slot", "workspace");
    if (!workspace.is_contiguous()) throw_invalid(op, "workspace must be contiguous");
    const int64_t needed = moe_lora_align_workspace_bytes(num_pairs, num_experts, num_slots,
                                                          token_slot.device);
    const int64_t bytes = workspace.numel() * static_cast<int64_t>(dtype_size(workspace.dtype));
    if (bytes < needed) {
      throw_invalid(op, "workspace must hold moe_lora_align_workspace_bytes = " +
                            std::to_string(needed) + " bytes, got " + workspace.describe());
    }
  }
  if (on_cuda(token_slot)) {
#if defined(MOELORA_WITH_CUDA) && MOELORA_CUDA_HAS_MOE_LORA_ALIGN
    return cuda::moe_lora_align(topk_ids, token_slot, num_experts, num_slots, block_m,
                                sorted_pairs, block_slot, block_expert, num_blocks, stream,
                                workspace);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::moe_lora_align(topk_ids, token_slot, num_experts, num_slots, block_m, sorted_pairs,
                      block_slot, block_expert, num_blocks);
}

void fused_moe_lora(const TensorRef& input, int32_t input_pairs_per_row, const TensorRef& output,
                    const TensorRef& topk_weights, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, int32_t block_m,
                    const std::vector<LoraSiteView>& slices,
                    const std::vector<int64_t>& col_offsets, void* stream,
                    int64_t active_slots) {
  constexpr const char* op = "fused_moe_lora";
  if (active_slots < 0) {
    throw_invalid(op, "active_slots must be >= 0 (0: unknown), got " +
                          std::to_string(active_slots));
  }
  if (is_absent(block_expert)) throw_invalid(op, "block_expert is required");
  check_block_metadata(sorted_pairs, block_slot, block_expert, num_blocks, block_m, op,
                       "sorted_pairs");
  check_lora_io(input, output, sorted_pairs, "sorted_pairs", slices, col_offsets, op);
  if (input_pairs_per_row <= 0) {
    throw_invalid(op, "input_pairs_per_row must be positive, got " +
                          std::to_string(input_pairs_per_row));
  }
  check_size(output, 0, input.shape[0] * input_pairs_per_row, op, "output",
             "input rows * input_pairs_per_row");
  check_topk_weights(topk_weights, input, output.shape[0], op);
  if (on_cuda(input)) {
#if defined(MOELORA_WITH_CUDA) && MOELORA_CUDA_HAS_FUSED_MOE_LORA
    return cuda::fused_moe_lora(input, input_pairs_per_row, output, topk_weights, sorted_pairs,
                                block_slot, block_expert, num_blocks, block_m, slices,
                                col_offsets, stream, active_slots);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::fused_moe_lora(input, input_pairs_per_row, output, topk_weights, sorted_pairs, block_slot,
                      block_expert, num_blocks, block_m, slices, col_offsets);
}

void fused_moe_lora_unsorted(const TensorRef& input, int32_t input_pairs_per_row,
                             const TensorRef& output, const TensorRef& topk_weights,
                             const TensorRef& topk_ids, const TensorRef& token_slot,
                             const std::vector<LoraSiteView>& slices,
                             const std::vector<int64_t>& col_offsets, void* stream) {
  constexpr const char* op = "fused_moe_lora_unsorted";
  const int64_t top_k = check_routing(topk_ids, token_slot, op);
  if (!is_absent(topk_ids) && !topk_ids.is_contiguous()) {
    throw_invalid(op, "topk_ids must be contiguous, got " + topk_ids.describe());
  }
  check_lora_io(input, output, token_slot, "token_slot", slices, col_offsets, op);
  if (input_pairs_per_row != 1 && input_pairs_per_row != top_k) {
    throw_invalid(op, "input_pairs_per_row must be 1 (one input row per pair) or top_k = " +
                          std::to_string(top_k) + " (one per token), got " +
                          std::to_string(input_pairs_per_row));
  }
  check_size(output, 0, token_slot.shape[0] * top_k, op, "output", "tokens * top_k pairs");
  check_size(input, 0, output.shape[0] / input_pairs_per_row, op, "input",
             "pairs / input_pairs_per_row");
  check_topk_weights(topk_weights, input, output.shape[0], op);
  if (on_cuda(input)) {
#if defined(MOELORA_WITH_CUDA) && MOELORA_CUDA_HAS_FUSED_MOE_LORA
    return cuda::fused_moe_lora_unsorted(input, input_pairs_per_row, output, topk_weights,
                                         topk_ids, token_slot, slices, col_offsets, stream);
#else
    no_cuda_kernel(op);
#endif
  }
  // The CPU reference is the grouped reference on a host-side alignment: same semantics.
  int32_t num_slots = 0, num_experts = 1;
  for (const LoraSiteView& v : slices) {
    num_slots = std::max(num_slots, v.num_slots);
    num_experts = std::max(num_experts, v.num_experts);
  }
  constexpr int32_t block_m = 1;
  const int64_t pairs = output.shape[0];
  const int64_t max_blocks = moe_lora_align_max_blocks(pairs, num_experts, num_slots, block_m);
  std::vector<int32_t> sorted(static_cast<size_t>(max_blocks * block_m)),
      block_slot(static_cast<size_t>(max_blocks)), block_expert(static_cast<size_t>(max_blocks)),
      count(1);
  const TensorRef sorted_ref = make_tensor_ref(sorted.data(), DType::kInt32, {max_blocks * block_m});
  const TensorRef slot_ref = make_tensor_ref(block_slot.data(), DType::kInt32, {max_blocks});
  const TensorRef expert_ref = make_tensor_ref(block_expert.data(), DType::kInt32, {max_blocks});
  const TensorRef count_ref = make_tensor_ref(count.data(), DType::kInt32, {1});
  cpu::moe_lora_align(topk_ids, token_slot, num_experts, num_slots, block_m, sorted_ref, slot_ref,
                      expert_ref, count_ref);
  cpu::fused_moe_lora(input, input_pairs_per_row, output, topk_weights, sorted_ref, slot_ref,
                      expert_ref, count_ref, block_m, slices, col_offsets, op);
}

void dense_lora(const TensorRef& input, const TensorRef& output, const TensorRef& sorted_rows,
                const TensorRef& block_slot, const TensorRef& num_blocks, int32_t block_m,
                const std::vector<LoraSiteView>& slices, const std::vector<int64_t>& col_offsets,
                void* stream) {
  constexpr const char* op = "dense_lora";
  check_block_metadata(sorted_rows, block_slot, TensorRef{}, num_blocks, block_m, op,
                       "sorted_rows");
  check_lora_io(input, output, sorted_rows, "sorted_rows", slices, col_offsets, op);
  check_size(output, 0, input.shape[0], op, "output", "one row per input row");
  if (on_cuda(input)) {
#if defined(MOELORA_WITH_CUDA) && MOELORA_CUDA_HAS_DENSE_LORA
    return cuda::dense_lora(input, output, sorted_rows, block_slot, num_blocks, block_m, slices,
                            col_offsets, stream);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::dense_lora(input, output, sorted_rows, block_slot, num_blocks, block_m, slices,
                  col_offsets);
}

int64_t kv_page_bytes_needed(int32_t block_tokens, int32_t num_kv_heads, int32_t head_dim,
                             DType dtype) {
  if (block_tokens <= 0 || num_kv_heads <= 0 || head_dim <= 0) {
    throw_invalid("kv_page_bytes_needed", "block_tokens, num_kv_heads and head_dim must be "
                                          "positive");
  }
  // K and V, unpadded; the pool rounds pages up to its own alignment.
  return 2 * int64_t{block_tokens} * num_kv_heads * head_dim *
         static_cast<int64_t>(dtype_size(dtype));
}

namespace {

// key/value/query/out: [T, heads, head_dim] in the cache dtype, contiguous last dimension.
void check_heads_tensor(const TensorRef& t, const KvCacheView& cache, int64_t heads,
                        const char* op, const char* arg) {
  check_dtype(t, cache.dtype, op, arg);
  check_ndim(t, 3, op, arg);
  check_last_dim_contiguous(t, op, arg);
  check_has_data(t, op, arg);
  if (heads > 0) check_size(t, 1, heads, op, arg, "heads");
  check_size(t, 2, cache.head_dim, op, arg, "cache.head_dim");
}

void check_int32_vector(const TensorRef& t, int64_t length, const char* op, const char* arg,
                        const char* what) {
  check_dtype(t, DType::kInt32, op, arg);
  check_ndim(t, 1, op, arg);
  check_size(t, 0, length, op, arg, what);
  check_has_data(t, op, arg);
}

}  // namespace

void kv_cache_write(const TensorRef& key, const TensorRef& value, const TensorRef& slot_mapping,
                    const KvCacheView& cache, void* stream) {
  constexpr const char* op = "kv_cache_write";
  check_kv_cache_view(cache, op);
  check_heads_tensor(key, cache, cache.num_kv_heads, op, "key");
  check_heads_tensor(value, cache, cache.num_kv_heads, op, "value");
  check_size(value, 0, key.shape[0], op, "value", "one row per key token");
  check_dtype(slot_mapping, DType::kInt64, op, "slot_mapping");
  check_ndim(slot_mapping, 1, op, "slot_mapping");
  check_size(slot_mapping, 0, key.shape[0], op, "slot_mapping", "one slot per key token");
  check_has_data(slot_mapping, op, "slot_mapping");
  check_same_device(key, value, op, "key", "value");
  check_same_device(key, slot_mapping, op, "key", "slot_mapping");
  if (on_cuda(key)) {
#if defined(MOELORA_WITH_CUDA) && MOELORA_CUDA_HAS_KV_CACHE_WRITE
    return cuda::kv_cache_write(key, value, slot_mapping, cache, stream);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::kv_cache_write(key, value, slot_mapping, cache);
}

void paged_attention(const TensorRef& out, const TensorRef& query, const TensorRef& query_seq,
                     const TensorRef& query_pos, const TensorRef& block_table,
                     const TensorRef& seq_lens, const KvCacheView& cache, float scale,
                     int32_t sliding_window, const TensorRef& sinks, void* stream) {
  constexpr const char* op = "paged_attention";
  check_kv_cache_view(cache, op);
  check_heads_tensor(query, cache, 0, op, "query");
  const int64_t num_tokens = query.shape[0];
  const int64_t num_heads = query.shape[1];
  if (num_heads <= 0 || num_heads % cache.num_kv_heads != 0) {
    throw_invalid(op, "query heads (" + std::to_string(num_heads) +
                          ") must be a positive multiple of cache.num_kv_heads (" +
                          std::to_string(cache.num_kv_heads) + ")");
  }
  check_heads_tensor(out, cache, num_heads, op, "out");
  check_size(out, 0, num_tokens, op, "out", "one row per query token");
  check_int32_vector(query_seq, num_tokens, op, "query_seq", "one per query token");
  check_int32_vector(query_pos, num_tokens, op, "query_pos", "one per query token");
  check_dtype(block_table, DType::kInt32, op, "block_table");
  check_ndim(block_table, 2, op, "block_table");
  check_has_data(block_table, op, "block_table");
  check_int32_vector(seq_lens, block_table.shape[0], op, "seq_lens", "one per block_table row");
  if (sliding_window < 0) {
    throw_invalid(op, "sliding_window must be >= 0 (0 = off), got " +
                          std::to_string(sliding_window));
  }
  if (!is_absent(sinks)) {
    check_dtype(sinks, DType::kFloat32, op, "sinks");
    check_ndim(sinks, 1, op, "sinks");
    check_size(sinks, 0, num_heads, op, "sinks", "one per query head");
    check_has_data(sinks, op, "sinks");
    check_same_device(query, sinks, op, "query", "sinks");
  }
  check_same_device(query, out, op, "query", "out");
  check_same_device(query, query_seq, op, "query", "query_seq");
  check_same_device(query, query_pos, op, "query", "query_pos");
  check_same_device(query, block_table, op, "query", "block_table");
  check_same_device(query, seq_lens, op, "query", "seq_lens");
  if (on_cuda(query)) {
#if defined(MOELORA_WITH_CUDA) && MOELORA_CUDA_HAS_PAGED_ATTENTION
    return cuda::paged_attention(out, query, query_seq, query_pos, block_table, seq_lens, cache,
                                 scale, sliding_window, sinks, stream);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::paged_attention(out, query, query_seq, query_pos, block_table, seq_lens, cache, scale,
                       sliding_window, sinks);
}

}  // namespace moelora
