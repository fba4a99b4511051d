// The paged KV cache ops of moelora/ops.h (kv_cache_write, paged_attention): check the
// arguments once (so the CPU and CUDA paths reject the same calls), then run on the device of
// the tensors with the caller's plan, or one made for the call.
#include <string>

#include "kernels/dispatch.h"
#include "kernels/validate.h"
#include "moelora/error.h"
#include "moelora/ops.h"

namespace moelora {

using namespace kernels;

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
  if (!on_cuda(key)) return cpu::kv_cache_write(key, value, slot_mapping, cache);
#ifdef MOELORA_WITH_CUDA
  cuda::kv_cache_write(key, value, slot_mapping, cache, stream);
#else
  no_cuda_kernel(op);
#endif
}

void paged_attention(const PagedAttentionArgs& a, void* stream, const AttentionPlan* plan) {
  constexpr const char* op = "paged_attention";
  const TensorRef &out = a.out, &query = a.query, &query_seq = a.query_seq,
                  &query_pos = a.query_pos, &block_table = a.block_table, &seq_lens = a.seq_lens,
                  &sinks = a.sinks;
  const KvCacheView& cache = a.cache;
  const int32_t sliding_window = a.sliding_window;
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
  if (!on_cuda(query)) return cpu::paged_attention(a);
#ifdef MOELORA_WITH_CUDA
  if (plan != nullptr) return cuda::paged_attention(a, *plan, stream);
  AttentionStep step;
  step.num_heads = static_cast<int32_t>(num_heads);
  step.num_kv_heads = cache.num_kv_heads;
  step.head_dim = cache.head_dim;
  step.page_bytes = cache.page_bytes;
  step.max_context = block_table.shape[1] * int64_t{cache.block_tokens};
  step.dtype = cache.dtype;
  cuda::paged_attention(
      a, plan_attention(step, device_props(query.device, query.device_index)), stream);
#else
  no_cuda_kernel(op);
#endif
}

}  // namespace moelora
