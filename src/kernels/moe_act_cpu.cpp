// CPU references of moe_activation and moe_sum (moelora/moe.h): element-wise float32 math with
// one rounding to the output dtype.
#include "half.h"
#include "kernels/cpu_parallel.h"
#include "kernels/moe_kernels.h"

namespace moelora::cpu {

namespace {

// Element j of row p of an optional addend as float (0 when absent).
template <typename T>
float addend_at(const TensorRef& addend, int64_t p, int64_t j) {
  if (addend.data == nullptr) return 0.0f;
  return to_float(static_cast<const T*>(addend.data)[p * addend.stride[0] + j]);
}

template <typename T>
void activate_rows(const TensorRef& h13, MoeActivation activation, float alpha, float limit,
                   const TensorRef& h, const TensorRef& addend, int64_t begin, int64_t end) {
  const int64_t inter = h.shape[1];
  for (int64_t p = begin; p < end; ++p) {
    const T* src = static_cast<const T*>(h13.data) + p * h13.stride[0];
    T* dst = static_cast<T*>(h.data) + p * h.stride[0];
    for (int64_t j = 0; j < inter; ++j) {
      const float gate = to_float(src[j]) + addend_at<T>(addend, p, j);
      const float up = to_float(src[inter + j]) + addend_at<T>(addend, p, inter + j);
      dst[j] = from_float<T>(activation == MoeActivation::kSilu
                                 ? moe_math::silu_glu(gate, up)
                                 : moe_math::gpt_oss_glu(gate, up, alpha, limit));
    }
  }
}

template <typename T>
void sum_rows(const TensorRef& y, int32_t top_k, const TensorRef& out, const TensorRef& addend,
              int64_t begin, int64_t end) {
  const int64_t width = out.shape[1];
  for (int64_t t = begin; t < end; ++t) {
    T* dst = static_cast<T*>(out.data) + t * out.stride[0];
    for (int64_t j = 0; j < width; ++j) {
      float sum = 0.0f;
      for (int32_t k = 0; k < top_k; ++k) {
        const int64_t pair = t * top_k + k;
        sum += to_float(static_cast<const T*>(y.data)[pair * y.stride[0] + j]) +
               addend_at<T>(addend, pair, j);
      }
      dst[j] = from_float<T>(sum);
    }
  }
}

}  // namespace

void moe_activation(const TensorRef& h13, MoeActivation activation, float swiglu_alpha,
                    float swiglu_limit, const TensorRef& h, const TensorRef& addend) {
  parallel_for(h.shape[0], h.shape[0] * h.shape[1] * 16, [&](int64_t begin, int64_t end) {
    switch (h.dtype) {
      case DType::kFloat32:
        activate_rows<float>(h13, activation, swiglu_alpha, swiglu_limit, h, addend, begin, end);
        break;
      case DType::kFloat16:
        activate_rows<Half>(h13, activation, swiglu_alpha, swiglu_limit, h, addend, begin, end);
        break;
      default:
        activate_rows<BFloat16>(h13, activation, swiglu_alpha, swiglu_limit, h, addend, begin, end);
        break;
    }
  });
}

void moe_sum(const TensorRef& y, int32_t top_k, const TensorRef& out, const TensorRef& addend) {
  parallel_for(out.shape[0], out.shape[0] * out.shape[1] * top_k, [&](int64_t begin, int64_t end) {
    switch (out.dtype) {
      case DType::kFloat32: sum_rows<float>(y, top_k, out, addend, begin, end); break;
      case DType::kFloat16: sum_rows<Half>(y, top_k, out, addend, begin, end); break;
      default: sum_rows<BFloat16>(y, top_k, out, addend, begin, end); break;
    }
  });
}

}  // namespace moelora::cpu
