// CPU reference of rope_qk and rope_kv_write (moelora/layer.h). Per token t at position p and
// each query and key head (pair i < D/2):
//   optional per-head norm: x = round(w * round(x / sqrt(sum(x^2) / D + eps)))
//   c = cos(float(p) * inv_freq[i]) * scaling, s = sin(...) * scaling   (float32)
//   x[i] = round(x[i] * c - x[i + D/2] * s), x[i + D/2] = round(x[i + D/2] * c + x[i] * s)
// each product and the sum rounded to float32, as torch computes the formula. Then, when a
// cache is given and slot_mapping[t] >= 0, the rotated key and the value are copied into the
// slot's page. Tokens are independent: work is split over tokens.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "half.h"
#include "kernels/cpu_parallel.h"
#include "kernels/layer_dispatch.h"
#include "kernels/validate.h"

namespace moelora::cpu {

namespace {

struct RopeProblem {
  const TensorRef* query;
  const TensorRef* key;
  const TensorRef* value;  // null: no cache write
  const TensorRef* positions;
  const float* inv_freq;  // [D/2]
  float scaling;
  const void* q_norm;  // [D] or null
  const void* k_norm;
  float norm_eps;
  const TensorRef* slot_mapping;
  const KvCacheView* cache;
};

template <typename T>
float round_to(float v) {
  return to_float(from_float<T>(v));
}

// One head of D elements at `row`, normalised (when `norm` is set) and rotated in place.
template <typename T>
void rotate_head(T* row, int64_t head_dim, const T* norm, float eps, const float* cos_f,
                 const float* sin_f, std::vector<float>& x) {
  for (int64_t d = 0; d < head_dim; ++d) x[d] = to_float(row[d]);
  if (norm != nullptr) {
    double sum = 0.0;
    for (int64_t d = 0; d < head_dim; ++d) sum += static_cast<double>(x[d]) * x[d];
    const float inv =
        1.0f / std::sqrt(static_cast<float>(sum) / static_cast<float>(head_dim) + eps);
    for (int64_t d = 0; d < head_dim; ++d) {
      x[d] = round_to<T>(to_float(norm[d]) * round_to<T>(x[d] * inv));
    }
  }
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float lo = x[i], hi = x[i + half];
    const float lo_c = lo * cos_f[i], hi_s = hi * sin_f[i];
    const float hi_c = hi * cos_f[i], lo_s = lo * sin_f[i];
    row[i] = from_float<T>(lo_c - hi_s);
    row[i + half] = from_float<T>(hi_c + lo_s);
  }
}

template <typename T>
void rope_tokens(const RopeProblem& p, int64_t begin, int64_t end) {
  const TensorRef& q = *p.query;
  const TensorRef& k = *p.key;
  const int64_t head_dim = q.shape[2], half = head_dim / 2;
  std::vector<float> cos_f(half), sin_f(half), x(head_dim);
  const auto* positions = static_cast<const int64_t*>(p.positions->data);
  const auto* q_norm = static_cast<const T*>(p.q_norm);
  const auto* k_norm = static_cast<const T*>(p.k_norm);
  for (int64_t t = begin; t < end; ++t) {
    const float position = static_cast<float>(positions[t * p.positions->stride[0]]);
    for (int64_t i = 0; i < half; ++i) {
      const float f = position * p.inv_freq[i];
      cos_f[i] = std::cos(f) * p.scaling;
      sin_f[i] = std::sin(f) * p.scaling;
    }
    for (int64_t h = 0; h < q.shape[1]; ++h) {
      T* row = static_cast<T*>(q.data) + t * q.stride[0] + h * q.stride[1];
      rotate_head(row, head_dim, q_norm, p.norm_eps, cos_f.data(), sin_f.data(), x);
    }
    for (int64_t h = 0; h < k.shape[1]; ++h) {
      T* row = static_cast<T*>(k.data) + t * k.stride[0] + h * k.stride[1];
      rotate_head(row, head_dim, k_norm, p.norm_eps, cos_f.data(), sin_f.data(), x);
    }
    if (p.cache == nullptr) continue;
    const int64_t slot =
        static_cast<const int64_t*>(p.slot_mapping->data)[t * p.slot_mapping->stride[0]];
    if (slot < 0) continue;
    const KvCacheView& cache = *p.cache;
    const TensorRef& v = *p.value;
    const int64_t page = slot / cache.block_tokens, in_page = slot % cache.block_tokens;
    const int64_t half_page = int64_t{cache.block_tokens} * cache.num_kv_heads * head_dim;
    T* k_page = reinterpret_cast<T*>(cache.arena + page * cache.page_bytes);
    for (int64_t g = 0; g < k.shape[1]; ++g) {
      T* k_dst = k_page + (in_page * cache.num_kv_heads + g) * head_dim;
      std::memcpy(k_dst, static_cast<const T*>(k.data) + t * k.stride[0] + g * k.stride[1],
                  head_dim * sizeof(T));
      std::memcpy(k_dst + half_page,
                  static_cast<const T*>(v.data) + t * v.stride[0] + g * v.stride[1],
                  head_dim * sizeof(T));
    }
  }
}

}  // namespace

void rope_kv_write(const TensorRef& query, const TensorRef& key, const TensorRef& value,
                   const TensorRef& positions, const TensorRef& inv_freq, float attention_scaling,
                   const TensorRef& q_norm, const TensorRef& k_norm, float norm_eps,
                   const TensorRef& slot_mapping, const KvCacheView* cache) {
  const int64_t tokens = query.shape[0];
  if (cache != nullptr) {  // contents are checked before any token is written
    const auto* slots = static_cast<const int64_t*>(slot_mapping.data);
    for (int64_t t = 0; t < tokens; ++t) {
      if (slots[t * slot_mapping.stride[0]] < -1) {
        kernels::throw_invalid("rope_kv_write",
                               "slot_mapping[" + std::to_string(t) + "] = " +
                                   std::to_string(slots[t * slot_mapping.stride[0]]) +
                                   " is negative but not -1");
      }
    }
  }
  const RopeProblem p{&query, &key, cache != nullptr ? &value : nullptr, &positions,
                      static_cast<const float*>(inv_freq.data), attention_scaling, q_norm.data,
                      k_norm.data, norm_eps, &slot_mapping, cache};
  const int64_t work = tokens * (query.shape[1] + key.shape[1]) * query.shape[2] * 8;
  parallel_for(tokens, work, [&](int64_t begin, int64_t end) {
    switch (query.dtype) {
      case DType::kFloat32: rope_tokens<float>(p, begin, end); break;
      case DType::kFloat16: rope_tokens<Half>(p, begin, end); break;
      default: rope_tokens<BFloat16>(p, begin, end); break;
    }
  });
}

}  // namespace moelora::cpu
