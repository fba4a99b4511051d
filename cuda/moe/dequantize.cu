// moe_dequantize on the GPU (contract: include/moelora/moe.h): experts of a stack in their dense
// form, the values moe_expert_gemm multiplies by, for a grouped GEMM at prefill.
//
// One thread per 16 bytes of a stored weight row (32 MXFP4 codes and their scale, 16 FP8
// values, or 8 dense elements): read once, decoded with the CPU reference's arithmetic (exact
// for MXFP4, the float32 product then one rounding for FP8), written as 16-byte vectors of the
// output dtype. Memory-bound: bytes read + bytes written over the HBM rate.
#include <cuda_fp8.h>

#include <algorithm>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "common/launch.cuh"
#include "kernels/moe_kernels.h"
#include "kernels/validate.h"
#include "mxfp4_layout.h"

namespace moelora::cuda {

namespace {

constexpr int kThreads = 256;

struct DequantArgs {
  const uint8_t* weight;  // expert e, row n at weight + e * w_expert + n * w_row (bytes)
  int64_t w_expert, w_row;
  const void* scales;  // MXFP4: uint8 [E][N][K/32]; FP8: float [E][N/bn][K/bk]
  int64_t s_expert, s_row, s_k;  // elements
  // MXFP4 tiles (kMmaTiled): block v of row n at mxfp4::tiled_block_offset(w_row, n, v) within
  // its expert, its scale at tiled_scale_offset(s_row, n, v): w_row and s_row are tile strides.
  bool tiled;
  int32_t block_n, block_k;
  MoeWeightFormat format;
  MoeMxfp4Layout mxfp4_layout;
  int64_t first_expert, experts, n_dim, k_dim;
  int64_t vectors_per_row;  // 16-byte vectors of a stored row
};

__device__ __forceinline__ float e2m1(uint32_t code) {
  const int exponent = static_cast<int>((code >> 1) & 3u);
  const float mantissa = static_cast<float>(code & 1u);
  const float v = exponent == 0 ? 0.5f * mantissa : ldexpf(1.0f + 0.5f * mantissa, exponent - 1);
  return code & 8u ? -v : v;
}

__device__ __forceinline__ float e4m3(uint8_t bits) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(bits, __NV_E4M3);
  __half v;
  memcpy(&v, &h, sizeof(v));
  return __half2float(v);
}

// Writes N (a multiple of the vector width) values as 16-byte vectors of T.
template <typename T, int N>
__device__ __forceinline__ void store_values(T* dst, const float (&v)[N]) {
  constexpr int kVec = detail::kVec16<T>;
#pragma unroll
  for (int i = 0; i < N; i += kVec) {
    float chunk[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) chunk[j] = v[i + j];
    detail::store_from_f32<T, kVec>(dst + i, chunk);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) moe_dequantize_kernel(DequantArgs a, T* out) {
  wait_for_previous_grid();
  const int64_t total = a.experts * a.n_dim * a.vectors_per_row;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kThreads) {
    const int64_t row = i / a.vectors_per_row, v = i - row * a.vectors_per_row;
    const int64_t local = row / a.n_dim, n = row - local * a.n_dim, e = a.first_expert + local;
    const int64_t at = a.tiled ? mxfp4::tiled_block_offset(a.w_row, n, v) : n * a.w_row + 16 * v;
    uint4 raw = *reinterpret_cast<const uint4*>(a.weight + e * a.w_expert + at);
    if (a.format == MoeWeightFormat::kMxfp4 && a.mxfp4_layout != MoeMxfp4Layout::kCheckpoint) {
      raw = make_uint4(mxfp4::from_mma(raw.x), mxfp4::from_mma(raw.y), mxfp4::from_mma(raw.z),
                       mxfp4::from_mma(raw.w));  // back to the checkpoint's nibbles
    }
    const auto* bytes = reinterpret_cast<const uint8_t*>(&raw);
    T* dst = out + row * a.k_dim;
    if (a.format == MoeWeightFormat::kMxfp4) {
      const auto* scales = static_cast<const uint8_t*>(a.scales);
      const int scale = scales[e * a.s_expert + (a.tiled ? mxfp4::tiled_scale_offset(a.s_row, n, v)
                                                          : n * a.s_row + v * a.s_k)];
      float values[32];
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        values[2 * j] = ldexpf(e2m1(bytes[j] & 0xFu), scale - 127);
        values[2 * j + 1] = ldexpf(e2m1(bytes[j] >> 4), scale - 127);
      }
      store_values<T, 32>(dst + 32 * v, values);
    } else if (a.format == MoeWeightFormat::kFp8Block) {
      const auto* scales = static_cast<const float*>(a.scales);
      const int64_t k0 = 16 * v;
      const float* block = scales + e * a.s_expert + (n / a.block_n) * a.s_row;
      float values[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) values[j] = e4m3(bytes[j]) * block[(k0 + j) / a.block_k];
      store_values<T, 16>(dst + k0, values);
    } else {
      *reinterpret_cast<uint4*>(dst + 16 * v / static_cast<int64_t>(sizeof(T))) = raw;
    }
  }
}

}  // namespace

void moe_dequantize(const MoeExpertWeights& weights, int64_t first_expert, const TensorRef& out,
                    void* stream) {
  const TensorRef& w = weights.weight;
  DequantArgs a{};
  a.format = weights.format;
  a.mxfp4_layout = weights.mxfp4_layout;
  const int64_t elem = weights.format == MoeWeightFormat::kDense
                           ? static_cast<int64_t>(dtype_size(w.dtype))
                           : 1;
  a.weight = static_cast<const uint8_t*>(w.data);
  a.w_expert = w.stride[0] * elem;
  a.w_row = w.stride[1] * elem;
  a.tiled = weights.mxfp4_layout == MoeMxfp4Layout::kMmaTiled;
  a.first_expert = first_expert;
  a.experts = out.shape[0];
  a.n_dim = out.shape[1];
  a.k_dim = out.shape[2];
  const int64_t row_bytes = weights.format == MoeWeightFormat::kMxfp4 ? a.k_dim / 2
                            : weights.format == MoeWeightFormat::kFp8Block
                                ? a.k_dim
                                : a.k_dim * elem;
  a.vectors_per_row = row_bytes / 16;
  if (!kernels::is_absent(weights.scales)) {
    a.scales = weights.scales.data;
    a.s_expert = weights.scales.stride[0];
    a.s_row = weights.scales.stride[1];
    a.s_k = weights.scales.stride[2];
  }
  a.block_n = weights.block_n;
  a.block_k = weights.block_k;
  const bool rows_ok = detail::aligned16(w.data) && a.w_row % 16 == 0 && a.w_expert % 16 == 0 &&
                       row_bytes % 16 == 0 &&
                       (weights.format != MoeWeightFormat::kMxfp4 || a.tiled || w.stride[2] == 16);
  if (!rows_ok || !detail::aligned16(out.data)) {
    throw InvalidArgument(
        "moe_dequantize: the GPU kernel needs 16-byte aligned weight rows whose bytes are a "
        "multiple of 16 (MXFP4 blocks contiguous along K) and a 16-byte aligned output");
  }
  const int64_t total = a.experts * a.n_dim * a.vectors_per_row;
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{detail::sm_count()} * 16))));
  shape.block = dim3(kThreads);
  shape.stream = detail::as_stream(stream);
  shape.after_previous_grid = true;
  MOELORA_DISPATCH_FLOAT(
      out.dtype, T, launch_kernel(moe_dequantize_kernel<T>, shape, a, static_cast<T*>(out.data)));
  detail::check_launch("moe_dequantize");
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
