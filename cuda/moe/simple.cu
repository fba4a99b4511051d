// The plain kernels of the MoE layer: the general expert GEMM (one warp per output element, any
// dtype, format, stride and alignment: float32 models, float16 with quantized weights, shapes
// the tensor-core kernel does not take, and a second opinion in the GPU tests), the gated
// activation and the sum over top-k. Element-wise math in float32 with one rounding, exactly
// the CPU references' (src/kernels/moe_*_cpu.cpp).
#include <cuda_fp8.h>

#include <algorithm>
#include <string>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "common/launch.cuh"
#include "kernels/moe_kernels.h"
#include "moe/gemm.cuh"
#include "mxfp4_layout.h"

namespace moelora::cuda {

namespace moe {

namespace {

constexpr int kSimpleWarps = 4;  // output columns per CTA (one per warp)

// The E2M1 value of a 4-bit code: sign, 2 exponent bits (bias 1), 1 mantissa bit.
__device__ __forceinline__ float e2m1(uint32_t code) {
  const int exponent = static_cast<int>((code >> 1) & 3u);
  const float mantissa = static_cast<float>(code & 1u);
  const float v = exponent == 0 ? 0.5f * mantissa : ldexpf(1.0f + 0.5f * mantissa, exponent - 1);
  return code & 8u ? -v : v;
}

// W[e, n, k] dequantized and rounded to T, as the CPU reference defines it.
template <typename T>
__device__ float weight_at(const GemmArgs& a, MoeWeightFormat format, int64_t e, int64_t n,
                           int64_t k) {
  const uint8_t* row = a.weight + e * a.w_expert + n * a.w_row;
  float v;
  switch (format) {
    case MoeWeightFormat::kDense: return detail::to_f32(reinterpret_cast<const T*>(row)[k]);
    case MoeWeightFormat::kMxfp4: {
      uint32_t code;
      const bool tiled = a.mxfp4_layout == MoeMxfp4Layout::kMmaTiled;
      if (tiled || a.mxfp4_layout == MoeMxfp4Layout::kMma) {
        // byte loads: rows may sit at any address
        const uint8_t* b =
            tiled ? a.weight + e * a.w_expert + mxfp4::tiled_block_offset(a.w_tile, n, k / 32) +
                        (k % 32) / 8 * 4
                  : row + (k / 8) * 4;
        const uint32_t word = b[0] | uint32_t{b[1]} << 8 | uint32_t{b[2]} << 16 |
                              uint32_t{b[3]} << 24;
        code = mxfp4::code_of_mma(word, static_cast<int>(k % 8));
      } else {
        const uint32_t byte = row[k / 2];
        code = k & 1 ? byte >> 4 : byte & 0xFu;
      }
      const auto* scales = static_cast<const uint8_t*>(a.scales);
      const int64_t at =
          tiled ? mxfp4::tiled_scale_offset(a.s_tile, n, k / 32) : n * a.s_row + k / 32;
      const int scale = scales[e * a.s_expert + at];
      v = ldexpf(e2m1(code), scale - 127);
      break;
    }
    default: {
      const __half_raw h = __nv_cvt_fp8_to_halfraw(row[k], __NV_E4M3);
      __half hv;
      memcpy(&hv, &h, sizeof(hv));
      const float* s = static_cast<const float*>(a.scales);
      v = __half2float(hv) * s[e * a.s_expert + (n / a.block_n) * a.s_row + k / a.block_k];
      break;
    }
  }
  return detail::to_f32(detail::from_f32<T>(v));
}

template <typename T>
__device__ float dot_row(const GemmArgs& a, MoeWeightFormat format, int64_t e, int64_t n,
                         const T* x) {
  float sum = 0.0f;
  for (int64_t k = threadIdx.x & 31; k < a.k_dim; k += 32) {
    sum += detail::to_f32(x[k]) * weight_at<T>(a, format, e, n, k);
  }
  return detail::warp_sum(sum);
}

// grid x = sorted rows (blocks * block_m), y = output column groups of kSimpleWarps.
template <typename T>
__global__ void __launch_bounds__(32 * kSimpleWarps) moe_gemm_simple_kernel(
    GemmArgs a, MoeWeightFormat format, int32_t block_m) {
  wait_for_previous_grid();
  const int64_t row = blockIdx.x;
  if (row / block_m >= *a.num_blocks) return;
  const int32_t p = a.sorted_pairs[row];
  if (p < 0) return;
  const int64_t e = a.block_expert[row / block_m];
  const int64_t col = int64_t{blockIdx.y} * kSimpleWarps + (threadIdx.x >> 5);
  const int64_t width = a.gated ? a.inter : a.n_dim;
  if (col >= width) return;
  const T* x = static_cast<const T*>(a.input) + (p / a.pairs_per_row) * a.input_stride;
  float value = dot_row<T>(a, format, e, col, x) + load_bias(a, e, col);
  if (a.gated) {
    const float up = dot_row<T>(a, format, e, a.inter + col, x) + load_bias(a, e, a.inter + col);
    value = a.activation == MoeActivation::kSilu
                ? moe_math::silu_glu(value, up)
                : moe_math::gpt_oss_glu(value, up, a.alpha, a.limit);
  }
  if (a.topk_weights != nullptr) value *= a.topk_weights[int64_t{p} * a.topk_stride];
  if ((threadIdx.x & 31) == 0) {
    static_cast<T*>(a.output)[int64_t{p} * a.output_stride + col] = detail::from_f32<T>(value);
  }
}

}  // namespace

void launch_gemm_simple(const GemmArgs& a, MoeWeightFormat format, DType dtype, int block_m,
                        int64_t max_blocks, cudaStream_t stream) {
  const int64_t width = a.gated ? a.inter : a.n_dim;
  const int64_t groups = (width + kSimpleWarps - 1) / kSimpleWarps;
  const int64_t rows = max_blocks * block_m;
  if (groups == 0 || rows == 0) return;
  if (groups > 65535) {
    throw InvalidArgument("moe_expert_gemm: the simple kernel takes at most " +
                          std::to_string(65535 * kSimpleWarps) + " output columns");
  }
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(rows), static_cast<unsigned>(groups));
  shape.block = dim3(32 * kSimpleWarps);
  shape.stream = stream;
  shape.after_previous_grid = true;
  MOELORA_DISPATCH_FLOAT(dtype, T,
                         launch_kernel(moe_gemm_simple_kernel<T>, shape, a, format, block_m));
}

}  // namespace moe

namespace {

constexpr int kElementThreads = 256;

// i / d, in 32 bits when both fit (a 64-bit division is a ~100-instruction subroutine).
__device__ __forceinline__ int64_t divide(int64_t i, int64_t d) {
  if (i <= 0xffffffffll && d <= 0xffffffffll) {
    return static_cast<uint32_t>(i) / static_cast<uint32_t>(d);
  }
  return i / d;
}

// Element j of row p of an optional addend (a LoRA delta computed apart) as float, 0 if absent.
template <typename T>
__device__ __forceinline__ float addend_at(const T* addend, int64_t stride, int64_t p,
                                           int64_t j) {
  return addend == nullptr ? 0.0f : detail::to_f32(addend[p * stride + j]);
}

template <typename T>
__global__ void __launch_bounds__(kElementThreads) moe_activation_kernel(
    const T* h13, int64_t h13_stride, const T* addend, int64_t addend_stride, T* h,
    int64_t h_stride, int64_t rows, int64_t inter, MoeActivation activation, float alpha,
    float limit) {
  wait_for_previous_grid();
  const int64_t total = rows * inter;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p = divide(i, inter), j = i - p * inter;
    const float gate =
        detail::to_f32(h13[p * h13_stride + j]) + addend_at(addend, addend_stride, p, j);
    const float up = detail::to_f32(h13[p * h13_stride + inter + j]) +
                     addend_at(addend, addend_stride, p, inter + j);
    h[p * h_stride + j] = detail::from_f32<T>(
        activation == MoeActivation::kSilu ? moe_math::silu_glu(gate, up)
                                           : moe_math::gpt_oss_glu(gate, up, alpha, limit));
  }
}

template <typename T>
__global__ void __launch_bounds__(kElementThreads)
    moe_sum_kernel(const T* y, int64_t y_stride, const T* addend, int64_t addend_stride, T* out,
                   int64_t out_stride, int64_t tokens, int64_t width, int32_t top_k) {
  wait_for_previous_grid();
  const int64_t total = tokens * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = divide(i, width), j = i - t * width;
    float sum = 0.0f;
    for (int32_t k = 0; k < top_k; ++k) {
      const int64_t pair = t * top_k + k;
      sum += detail::to_f32(y[pair * y_stride + j]) + addend_at(addend, addend_stride, pair, j);
    }
    out[t * out_stride + j] = detail::from_f32<T>(sum);
  }
}

// The same sum, one 16-byte vector of a row per thread (rows and strides 16-byte aligned): the
// top_k loads of a vector are independent, so they are in flight together.
template <typename T>
__global__ void __launch_bounds__(kElementThreads) moe_sum_vector_kernel(
    const T* y, int64_t y_stride, const T* addend, int64_t addend_stride, T* out,
    int64_t out_stride, int64_t tokens, int64_t width, int32_t top_k) {
  constexpr int kVec = detail::kVec16<T>;
  wait_for_previous_grid();
  const int64_t vectors = width / kVec, total = tokens * vectors;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = divide(i, vectors), j = (i - t * vectors) * kVec;
    float sum[kVec] = {};
#pragma unroll 4
    for (int32_t k = 0; k < top_k; ++k) {
      const int64_t pair = t * top_k + k;
      float v[kVec], a[kVec] = {};
      detail::load_f32<T, kVec>(y + pair * y_stride + j, v);
      if (addend != nullptr) detail::load_f32<T, kVec>(addend + pair * addend_stride + j, a);
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum[e] += v[e] + a[e];
    }
    detail::store_from_f32<T, kVec>(out + t * out_stride + j, sum);
  }
}

LaunchShape element_shape(int64_t total, cudaStream_t stream) {
  LaunchShape shape;
  const int64_t ctas = std::min<int64_t>((total + kElementThreads - 1) / kElementThreads,
                                         int64_t{detail::sm_count()} * 8);
  shape.grid = dim3(static_cast<unsigned>(std::max<int64_t>(1, ctas)));
  shape.block = dim3(kElementThreads);
  shape.stream = stream;
  shape.after_previous_grid = true;
  return shape;
}

}  // namespace

void moe_activation(const TensorRef& h13, MoeActivation activation, float swiglu_alpha,
                    float swiglu_limit, const TensorRef& h, void* stream,
                    const TensorRef& addend) {
  const int64_t total = h.shape[0] * h.shape[1];
  if (total == 0) return;
  const LaunchShape shape = element_shape(total, detail::as_stream(stream));
  const int64_t addend_stride = addend.data != nullptr ? addend.stride[0] : 0;
  MOELORA_DISPATCH_FLOAT(h.dtype, T,
                         launch_kernel(moe_activation_kernel<T>, shape,
                                       static_cast<const T*>(h13.data), h13.stride[0],
                                       static_cast<const T*>(addend.data), addend_stride,
                                       static_cast<T*>(h.data), h.stride[0], h.shape[0],
                                       h.shape[1], activation, swiglu_alpha, swiglu_limit));
  detail::check_launch("moe_activation");
}

void moe_sum(const TensorRef& y, int32_t top_k, const TensorRef& out, void* stream,
             const TensorRef& addend) {
  const int64_t total = out.shape[0] * out.shape[1];
  if (total == 0) return;
  const cudaStream_t s = detail::as_stream(stream);
  const int64_t elem = static_cast<int64_t>(dtype_size(out.dtype));
  const int64_t vec = 16 / elem;
  const bool has_addend = addend.data != nullptr;
  const int64_t addend_stride = has_addend ? addend.stride[0] : 0;
  const bool vectors = out.shape[1] % vec == 0 && detail::aligned16(y.data) &&
                       detail::aligned16(out.data) && (y.stride[0] * elem) % 16 == 0 &&
                       (out.stride[0] * elem) % 16 == 0 &&
                       (!has_addend ||
                        (detail::aligned16(addend.data) && (addend_stride * elem) % 16 == 0));
  const LaunchShape shape = element_shape(vectors ? total / vec : total, s);
  if (vectors) {
    MOELORA_DISPATCH_FLOAT(out.dtype, T,
                           launch_kernel(moe_sum_vector_kernel<T>, shape,
                                         static_cast<const T*>(y.data), y.stride[0],
                                         static_cast<const T*>(addend.data), addend_stride,
                                         static_cast<T*>(out.data), out.stride[0], out.shape[0],
                                         out.shape[1], top_k));
  } else {
    MOELORA_DISPATCH_FLOAT(out.dtype, T,
                           launch_kernel(moe_sum_kernel<T>, shape, static_cast<const T*>(y.data),
                                         y.stride[0], static_cast<const T*>(addend.data),
                                         addend_stride, static_cast<T*>(out.data),
                                         out.stride[0], out.shape[0], out.shape[1], top_k));
  }
  detail::check_launch("moe_sum");
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
