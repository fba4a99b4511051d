// RMSNorm and the residual add fused into it (moelora/layer.h: rms_norm, add_rms_norm):
//   add form: residual[t] = round(residual[t] + x[t]); h = that row (plain form: h = x[t])
//   inv = 1 / sqrt(sum(h^2) / H + eps)
//   out[t] = round(w * round(h * inv))  (weight in the activation dtype: Llama, Qwen)
//            round(w * (h * inv))       (float32 weight: GPT-OSS)
// Grid: one CTA per token (row). Its threads stride over the row in 16-byte vectors (VEC
// elements) plus a scalar tail for H % VEC, keep a float32 sum of squares, reduce it by warp
// shuffles and then shared memory, and make a second pass that re-reads the row and writes the
// output. Each thread re-reads only the elements it read or wrote in the first pass, so `out`
// may be the input itself, and the add form's residual is read back from L1/L2.
// Memory-bound at every size (each row read once or twice, written once or twice); at decode a
// launch of a few CTAs whose time is the launch and one block reduction. Rows that are not
// 16-byte aligned (e.g. H = 111 contiguous in 16-bit) take VEC = 1.
#include <type_traits>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "kernels/layer_dispatch.h"

namespace moelora::cuda {

namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;

struct NormArgs {
  const void* input;  // [T, H] row stride input_stride
  int64_t input_stride;
  void* residual;  // [T, H] row stride residual_stride; null for the plain form
  int64_t residual_stride;
  const void* weight;  // [H], T or float32
  void* out;           // [T, H] row stride out_stride
  int64_t out_stride;
  int64_t hidden;
  float eps;
};

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return detail::to_f32(detail::from_f32<T>(v));
}

// N consecutive elements of E as float32: one scalar, or N * sizeof(E) / 16 vector loads (src
// 16-byte aligned).
template <typename E, int N>
__device__ __forceinline__ void load_as_f32(const E* src, float (&dst)[N]) {
  if constexpr (N == 1) {
    dst[0] = detail::to_f32(src[0]);
  } else {
    constexpr int kPerVector = 16 / static_cast<int>(sizeof(E));
    static_assert(N % kPerVector == 0, "whole 16-byte vectors only");
#pragma unroll
    for (int c = 0; c < N / kPerVector; ++c) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src + c * kPerVector);
      const E* elems = reinterpret_cast<const E*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerVector; ++i) dst[c * kPerVector + i] = detail::to_f32(elems[i]);
    }
  }
}

// The normalised value times the weight, rounded as the weight's dtype says (see the header).
template <typename T, typename W>
__device__ __forceinline__ float scaled(float h, float inv, float w) {
  const float n = h * inv;
  if constexpr (std::is_same_v<W, float>) {
    return w * n;
  } else {
    return w * round_to<T>(n);
  }
}

// h (the row's values as normalised) for N elements at column `col`; the add form first adds
// and stores the residual.
template <typename T, int N, bool kAdd>
__device__ __forceinline__ void first_pass(const T* x, T* r, int64_t col, float (&h)[N]) {
  load_as_f32<T, N>(x + col, h);
  if constexpr (kAdd) {
    float res[N];
    load_as_f32<T, N>(r + col, res);
#pragma unroll
    for (int i = 0; i < N; ++i) h[i] = round_to<T>(res[i] + h[i]);
    detail::store_from_f32<T, N>(r + col, h);  // h holds representable values: exact
  }
}

template <typename T, typename W, int N>
__device__ __forceinline__ void second_pass(const T* src, const W* w, T* o, int64_t col,
                                            float inv) {
  float h[N], weight[N], out[N];
  load_as_f32<T, N>(src + col, h);
  load_as_f32<W, N>(w + col, weight);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = scaled<T, W>(h[i], inv, weight[i]);
  detail::store_from_f32<T, N>(o + col, out);
}

template <typename T, typename W, int VEC, bool kAdd>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_kernel(const NormArgs a) {
  __shared__ float warp_sums[kMaxWarps];
  __shared__ float inv_rms;
  const int64_t t = blockIdx.x;
  const T* x = static_cast<const T*>(a.input) + t * a.input_stride;
  T* r = kAdd ? static_cast<T*>(a.residual) + t * a.residual_stride : nullptr;
  const T* src = kAdd ? r : x;
  const W* w = static_cast<const W*>(a.weight);
  T* o = static_cast<T*>(a.out) + t * a.out_stride;
  const int64_t num_vectors = a.hidden / VEC;
  const int64_t tail = num_vectors * VEC;

  float sum_sq = 0.0f;
  for (int64_t v = threadIdx.x; v < num_vectors; v += blockDim.x) {
    float h[VEC];
    first_pass<T, VEC, kAdd>(x, r, v * VEC, h);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum_sq += h[i] * h[i];
  }
  for (int64_t col = tail + threadIdx.x; col < a.hidden; col += blockDim.x) {
    float h[1];
    first_pass<T, 1, kAdd>(x, r, col, h);
    sum_sq += h[0] * h[0];
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  sum_sq = detail::warp_sum(sum_sq);
  if (lane == 0) warp_sums[warp] = sum_sq;
  __syncthreads();
  if (warp == 0) {
    float total = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0f;
    total = detail::warp_sum(total);
    // Division and square root are IEEE (no fast math), as torch's rsqrt on the CPU computes.
    if (lane == 0) inv_rms = 1.0f / sqrtf(total / static_cast<float>(a.hidden) + a.eps);
  }
  __syncthreads();
  const float inv = inv_rms;

  for (int64_t v = threadIdx.x; v < num_vectors; v += blockDim.x) {
    second_pass<T, W, VEC>(src, w, o, v * VEC, inv);
  }
  for (int64_t col = tail + threadIdx.x; col < a.hidden; col += blockDim.x) {
    second_pass<T, W, 1>(src, w, o, col, inv);
  }
}

template <typename T, typename W, bool kAdd>
void launch(const NormArgs& a, int64_t rows, bool vectorized, cudaStream_t stream) {
  constexpr int kVec = detail::kVec16<T>;
  const int vec = vectorized ? kVec : 1;
  const int64_t per_thread_items = detail::max64(a.hidden / vec, a.hidden % vec);
  const int threads = static_cast<int>(
      detail::min64(kMaxThreads, detail::max64(32, (per_thread_items + 31) / 32 * 32)));
  const dim3 grid(static_cast<unsigned>(rows));
  if (vectorized) {
    rms_norm_kernel<T, W, kVec, kAdd><<<grid, threads, 0, stream>>>(a);
  } else {
    rms_norm_kernel<T, W, 1, kAdd><<<grid, threads, 0, stream>>>(a);
  }
}

}  // namespace

void rms_norm(const TensorRef& input, const TensorRef& residual, const TensorRef& weight,
              float eps, const TensorRef& out, void* stream) {
  const int64_t rows = input.shape[0];
  if (rows == 0) return;
  if (rows > 0x7fffffffLL) {
    throw InvalidArgument("rms_norm: at most 2^31 - 1 rows on the GPU, got " +
                          std::to_string(rows));
  }
  const bool add = residual.data != nullptr;
  const NormArgs a{input.data, input.stride[0],    residual.data, add ? residual.stride[0] : 0,
                   weight.data, out.data,           out.stride[0], input.shape[1],
                   eps};
  const bool vectorized = detail::rows_aligned16(input) && detail::rows_aligned16(out) &&
                          (!add || detail::rows_aligned16(residual)) &&
                          detail::aligned16(weight.data);
  const cudaStream_t s = detail::as_stream(stream);
  MOELORA_DISPATCH_FLOAT(input.dtype, T, {
    if (weight.dtype == DType::kFloat32) {
      add ? launch<T, float, true>(a, rows, vectorized, s)
          : launch<T, float, false>(a, rows, vectorized, s);
    } else {
      add ? launch<T, T, true>(a, rows, vectorized, s) : launch<T, T, false>(a, rows, vectorized, s);
    }
  });
  detail::check_launch(add ? "add_rms_norm" : "rms_norm");
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
