// CPU reference of rms_norm and add_rms_norm (moelora/layer.h), per row t:
//   h = round(residual[t] + input[t]) stored back into residual (add_rms_norm) or input[t]
//   inv = 1 / sqrt(sum(h^2) / H + eps)   (the sum in float64, then float32 as the models do)
//   out = round(w * round(h * inv)) for a weight of the activation dtype (Llama, Qwen),
//         round(w * (h * inv))      for a float32 weight (GPT-OSS)
// Rows are independent: work is split over rows, each thread writes only its own.
#include <cmath>
#include <type_traits>

#include "half.h"
#include "kernels/cpu_parallel.h"
#include "kernels/layer_dispatch.h"

namespace moelora::cpu {

namespace {

template <typename T>
float round_to(float v) {
  return to_float(from_float<T>(v));
}

template <typename T, typename W>
void norm_rows(const TensorRef& input, const TensorRef& residual, const TensorRef& weight,
               float eps, const TensorRef& out, int64_t begin, int64_t end) {
  const int64_t hidden = input.shape[1];
  const W* w = static_cast<const W*>(weight.data);
  const bool add = residual.data != nullptr;
  for (int64_t t = begin; t < end; ++t) {
    const T* x = static_cast<const T*>(input.data) + t * input.stride[0];
    T* r = add ? static_cast<T*>(residual.data) + t * residual.stride[0] : nullptr;
    T* o = static_cast<T*>(out.data) + t * out.stride[0];
    // The normalised values come from `source`: the updated residual, or the input. Reading it
    // again in the second loop keeps `out == input` safe.
    const T* source = add ? r : x;
    double sum = 0.0;
    for (int64_t i = 0; i < hidden; ++i) {
      float h = to_float(x[i]);
      if (add) {
        r[i] = from_float<T>(to_float(r[i]) + h);
        h = to_float(r[i]);
      }
      sum += static_cast<double>(h) * h;
    }
    const float inv =
        1.0f / std::sqrt(static_cast<float>(sum) / static_cast<float>(hidden) + eps);
    for (int64_t i = 0; i < hidden; ++i) {
      const float n = to_float(source[i]) * inv;
      if constexpr (std::is_same_v<W, float>) {
        o[i] = from_float<T>(w[i] * n);
      } else {
        o[i] = from_float<T>(to_float(w[i]) * round_to<T>(n));
      }
    }
  }
}

template <typename T>
void norm_typed(const TensorRef& input, const TensorRef& residual, const TensorRef& weight,
                float eps, const TensorRef& out) {
  const int64_t rows = input.shape[0];
  parallel_for(rows, rows * input.shape[1] * 4, [&](int64_t begin, int64_t end) {
    if (weight.dtype == DType::kFloat32) {
      norm_rows<T, float>(input, residual, weight, eps, out, begin, end);
    } else {
      norm_rows<T, T>(input, residual, weight, eps, out, begin, end);
    }
  });
}

}  // namespace

void rms_norm(const TensorRef& input, const TensorRef& residual, const TensorRef& weight,
              float eps, const TensorRef& out) {
  switch (input.dtype) {
    case DType::kFloat32: norm_typed<float>(input, residual, weight, eps, out); break;
    case DType::kFloat16: norm_typed<Half>(input, residual, weight, eps, out); break;
    default: norm_typed<BFloat16>(input, residual, weight, eps, out); break;
  }
}

}  // namespace moelora::cpu
