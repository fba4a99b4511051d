// CPU reference of moe_router_logits (moelora/moe.h): per token and expert, the float32 sum of
// x[t, h] * weight[e, h] in index order, plus the bias, rounded once to the activation dtype.
// Work is split over tokens; each thread writes its own rows of logits.
#include "half.h"
#include "kernels/cpu_parallel.h"
#include "kernels/moe_kernels.h"

namespace moelora::cpu {

namespace {

template <typename T>
void logits_rows(const TensorRef& x, const TensorRef& weight, const TensorRef& bias,
                 const TensorRef& logits, int64_t begin, int64_t end) {
  const int64_t hidden = x.shape[1], experts = weight.shape[0];
  const T* b = static_cast<const T*>(bias.data);
  for (int64_t t = begin; t < end; ++t) {
    const T* row = static_cast<const T*>(x.data) + t * x.stride[0];
    T* out = static_cast<T*>(logits.data) + t * logits.stride[0];
    for (int64_t e = 0; e < experts; ++e) {
      const T* w = static_cast<const T*>(weight.data) + e * weight.stride[0];
      float sum = 0.0f;
      for (int64_t h = 0; h < hidden; ++h) sum += to_float(row[h]) * to_float(w[h]);
      if (b != nullptr) sum += to_float(b[e]);
      out[e] = from_float<T>(sum);
    }
  }
}

}  // namespace

void moe_router_logits(const TensorRef& x, const TensorRef& weight, const TensorRef& bias,
                       const TensorRef& logits) {
  const int64_t tokens = x.shape[0];
  parallel_for(tokens, tokens * x.shape[1] * weight.shape[0], [&](int64_t begin, int64_t end) {
    switch (x.dtype) {
      case DType::kFloat32: logits_rows<float>(x, weight, bias, logits, begin, end); break;
      case DType::kFloat16: logits_rows<Half>(x, weight, bias, logits, begin, end); break;
      default: logits_rows<BFloat16>(x, weight, bias, logits, begin, end); break;
    }
  });
}

}  // namespace moelora::cpu
