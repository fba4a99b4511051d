// The public ops of moelora/layer.h: check the arguments once (so the CPU and CUDA paths reject
// the same calls), then run on the device of the tensors.
#include <cmath>
#include <string>

#include "kernels/layer_dispatch.h"
#include "kernels/validate.h"
#include "moelora/layer.h"

namespace moelora {

using namespace kernels;

namespace {

// [T, H] rows of the activation dtype: strided rows, contiguous last dimension.
void check_rows(const TensorRef& t, DType dtype, int64_t rows, int64_t width, const char* op,
                const char* arg) {
  check_dtype(t, dtype, op, arg);
  check_ndim(t, 2, op, arg);
  check_size(t, 0, rows, op, arg, "one row per input token");
  check_size(t, 1, width, op, arg, "the input's width");
  check_last_dim_contiguous(t, op, arg);
  check_has_data(t, op, arg);
}

// A contiguous 1-D vector of `length` elements.
void check_vector(const TensorRef& t, int64_t length, const char* op, const char* arg,
                  const char* what) {
  check_ndim(t, 1, op, arg);
  check_size(t, 0, length, op, arg, what);
  check_last_dim_contiguous(t, op, arg);
  check_has_data(t, op, arg);
}

void check_eps(float eps, const char* op, const char* arg) {
  if (!std::isfinite(eps) || eps < 0.0f) {
    throw_invalid(op, std::string(arg) + " must be finite and >= 0, got " + std::to_string(eps));
  }
}

void check_norm_args(const TensorRef& input, const TensorRef& weight, float eps,
                     const TensorRef& out, const char* op) {
  check_float_dtype(input, op, "input");
  check_ndim(input, 2, op, "input");
  check_last_dim_contiguous(input, op, "input");
  check_has_data(input, op, "input");
  const int64_t hidden = input.shape[1];
  if (hidden <= 0) throw_invalid(op, "input must have a positive width, got " + input.describe());
  if (weight.dtype != input.dtype && weight.dtype != DType::kFloat32) {
    throw_invalid(op, std::string("weight must be float32 or the input's dtype ") +
                          dtype_name(input.dtype) + ", got " + weight.describe());
  }
  check_vector(weight, hidden, op, "weight", "the input's width");
  check_rows(out, input.dtype, input.shape[0], hidden, op, "out");
  check_eps(eps, op, "eps");
  check_same_device(input, weight, op, "input", "weight");
  check_same_device(input, out, op, "input", "out");
  if (out.data == input.data && input.shape[0] > 1 && out.stride[0] != input.stride[0]) {
    throw_invalid(op, "out may be input itself, but not a differently strided view of it: " +
                          out.describe() + " vs " + input.describe());
  }
}

// Heads [T, heads, D] of the activation dtype: strided rows and heads, contiguous last dimension.
void check_heads(const TensorRef& t, DType dtype, int64_t tokens, int64_t head_dim,
                 const char* op, const char* arg) {
  check_dtype(t, dtype, op, arg);
  check_ndim(t, 3, op, arg);
  check_size(t, 0, tokens, op, arg, "one row per query token");
  check_size(t, 2, head_dim, op, arg, "the query's head_dim");
  if (t.shape[1] <= 0) throw_invalid(op, std::string(arg) + " must have at least one head");
  check_last_dim_contiguous(t, op, arg);
  check_has_data(t, op, arg);
}

void check_rope_args(const TensorRef& query, const TensorRef& key, const TensorRef& positions,
                     const TensorRef& inv_freq, float attention_scaling, const TensorRef& q_norm,
                     const TensorRef& k_norm, float norm_eps, const char* op) {
  check_float_dtype(query, op, "query");
  check_ndim(query, 3, op, "query");
  const int64_t tokens = query.shape[0], head_dim = query.shape[2];
  if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > kRopeMaxHeadDim) {
    throw_invalid(op, "head_dim must be even and in [2, " + std::to_string(kRopeMaxHeadDim) +
                          "], got " + query.describe());
  }
  check_heads(query, query.dtype, tokens, head_dim, op, "query");
  check_heads(key, query.dtype, tokens, head_dim, op, "key");
  check_dtype(positions, DType::kInt64, op, "positions");
  check_ndim(positions, 1, op, "positions");
  check_size(positions, 0, tokens, op, "positions", "one per query token");
  check_has_data(positions, op, "positions");
  check_dtype(inv_freq, DType::kFloat32, op, "inv_freq");
  check_vector(inv_freq, head_dim / 2, op, "inv_freq", "head_dim / 2 frequencies");
  if (!std::isfinite(attention_scaling)) {
    throw_invalid(op, "attention_scaling must be finite, got " + std::to_string(attention_scaling));
  }
  if (is_absent(q_norm) != is_absent(k_norm)) {
    throw_invalid(op, "q_norm and k_norm must be given together (or neither)");
  }
  if (!is_absent(q_norm)) {
    check_dtype(q_norm, query.dtype, op, "q_norm");
    check_vector(q_norm, head_dim, op, "q_norm", "head_dim");
    check_dtype(k_norm, query.dtype, op, "k_norm");
    check_vector(k_norm, head_dim, op, "k_norm", "head_dim");
    check_eps(norm_eps, op, "norm_eps");
    check_same_device(query, q_norm, op, "query", "q_norm");
    check_same_device(query, k_norm, op, "query", "k_norm");
  }
  check_same_device(query, key, op, "query", "key");
  check_same_device(query, positions, op, "query", "positions");
  check_same_device(query, inv_freq, op, "query", "inv_freq");
}

}  // namespace

void rms_norm(const TensorRef& input, const TensorRef& weight, float eps, const TensorRef& out,
              void* stream) {
  constexpr const char* op = "rms_norm";
  check_norm_args(input, weight, eps, out, op);
  if (on_cuda(input)) {
#ifdef MOELORA_WITH_CUDA
    return cuda::rms_norm(input, TensorRef{}, weight, eps, out, stream);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::rms_norm(input, TensorRef{}, weight, eps, out);
}

void add_rms_norm(const TensorRef& input, const TensorRef& residual, const TensorRef& weight,
                  float eps, const TensorRef& out, void* stream) {
  constexpr const char* op = "add_rms_norm";
  check_norm_args(input, weight, eps, out, op);
  check_rows(residual, input.dtype, input.shape[0], input.shape[1], op, "residual");
  check_same_device(input, residual, op, "input", "residual");
  if (input.shape[0] > 0 && (residual.data == input.data || residual.data == out.data)) {
    throw_invalid(op, "residual is updated in place and must not share memory with input or out");
  }
  if (on_cuda(input)) {
#ifdef MOELORA_WITH_CUDA
    return cuda::rms_norm(input, residual, weight, eps, out, stream);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::rms_norm(input, residual, weight, eps, out);
}

void rope_qk(const TensorRef& query, const TensorRef& key, const TensorRef& positions,
             const TensorRef& inv_freq, float attention_scaling, const TensorRef& q_norm,
             const TensorRef& k_norm, float norm_eps, void* stream) {
  constexpr const char* op = "rope_qk";
  check_rope_args(query, key, positions, inv_freq, attention_scaling, q_norm, k_norm, norm_eps,
                  op);
  if (on_cuda(query)) {
#ifdef MOELORA_WITH_CUDA
    return cuda::rope_kv_write(query, key, TensorRef{}, positions, inv_freq, attention_scaling,
                               q_norm, k_norm, norm_eps, TensorRef{}, nullptr, stream);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::rope_kv_write(query, key, TensorRef{}, positions, inv_freq, attention_scaling, q_norm,
                     k_norm, norm_eps, TensorRef{}, nullptr);
}

void rope_kv_write(const TensorRef& query, const TensorRef& key, const TensorRef& value,
                   const TensorRef& positions, const TensorRef& inv_freq, float attention_scaling,
                   const TensorRef& q_norm, const TensorRef& k_norm, float norm_eps,
                   const TensorRef& slot_mapping, const KvCacheView& cache, void* stream) {
  constexpr const char* op = "rope_kv_write";
  check_rope_args(query, key, positions, inv_freq, attention_scaling, q_norm, k_norm, norm_eps,
                  op);
  check_heads(value, query.dtype, query.shape[0], query.shape[2], op, "value");
  check_size(value, 1, key.shape[1], op, "value", "key's number of heads");
  check_dtype(slot_mapping, DType::kInt64, op, "slot_mapping");
  check_ndim(slot_mapping, 1, op, "slot_mapping");
  check_size(slot_mapping, 0, query.shape[0], op, "slot_mapping", "one slot per query token");
  check_has_data(slot_mapping, op, "slot_mapping");
  check_kv_cache_view(cache, op);
  if (cache.dtype != query.dtype || cache.num_kv_heads != key.shape[1] ||
      cache.head_dim != query.shape[2]) {
    throw_invalid(op, std::string("cache holds ") + dtype_name(cache.dtype) + " with " +
                          std::to_string(cache.num_kv_heads) + " KV heads of " +
                          std::to_string(cache.head_dim) + " dims, but key is " + key.describe());
  }
  check_same_device(query, value, op, "query", "value");
  check_same_device(query, slot_mapping, op, "query", "slot_mapping");
  if (on_cuda(query)) {
#ifdef MOELORA_WITH_CUDA
    return cuda::rope_kv_write(query, key, value, positions, inv_freq, attention_scaling, q_norm,
                               k_norm, norm_eps, slot_mapping, &cache, stream);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::rope_kv_write(query, key, value, positions, inv_freq, attention_scaling, q_norm, k_norm,
                     norm_eps, slot_mapping, &cache);
}

}  // namespace moelora
