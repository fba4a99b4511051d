// moe_router_logits on the GPU (contract: include/moelora/moe.h): logits = round(x W^T + b), the
// router GEMM of decode steps in one launch, where cuBLAS runs a split-K GEMM and its reduction.
//
// Grid mapping: one warp per (expert, group of kTokensPerWarp tokens), kWarps warps a CTA, the
// experts varying fastest so that the warps of a CTA share token rows (through L1). A warp
// streams its expert's weight row once, in 16-byte vectors (scalars when a row or the row
// stride is not 16-byte aligned), kUnroll vectors of the weight row and of each token row in
// flight per lane before any is used; each lane keeps float32 partial sums per token, and a
// shuffle reduction ends each dot product. The sum order is the lanes' (the CPU reference sums
// in index order), so the two agree to float32 rounding before the one rounding to the
// activation dtype.
// At decode the weights are E x H elements (184 KB for gpt-oss-20b): the kernel costs a few DRAM
// round trips, and it is launched with PDL so that moe_route, which follows it, starts at once.
#include <string>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "common/launch.cuh"
#include "kernels/moe_kernels.h"

namespace moelora::cuda {

namespace {

using detail::raw_to_f32;
using detail::RawVec;

constexpr int kWarps = 8;
constexpr int kTokensPerWarp = 4;
constexpr int kUnroll = 4;  // vectors of a row a lane loads before it uses any

struct RouterArgs {
  const void* x;  // [T, H] row stride x_stride
  int64_t x_stride;
  const void* weight;  // [E, H] row stride weight_stride
  int64_t weight_stride;
  const void* bias;  // [E] or null
  void* logits;      // [T, E] row stride logits_stride
  int64_t logits_stride;
  int64_t num_tokens, hidden;
  int32_t num_experts;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarps * 32) router_logits_kernel(const RouterArgs a) {
  wait_for_previous_grid();  // memory only from here (common/launch.cuh)
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t work = blockIdx.x * int64_t{kWarps} + (threadIdx.x >> 5);
  const int64_t groups = (a.num_tokens + kTokensPerWarp - 1) / kTokensPerWarp;
  const int32_t e = static_cast<int32_t>(work % a.num_experts);
  const int64_t t0 = work / a.num_experts * kTokensPerWarp;
  const int tokens = static_cast<int>(detail::min64(kTokensPerWarp, a.num_tokens - t0));
  float acc[kTokensPerWarp] = {};
  if (work < groups * a.num_experts) {  // uniform over the warp
    const T* w = static_cast<const T*>(a.weight) + e * a.weight_stride;
    const T* x = static_cast<const T*>(a.x) + t0 * a.x_stride;
    for (int64_t d0 = int64_t{lane} * VEC; d0 < a.hidden; d0 += 32 * VEC * kUnroll) {
      RawVec<T, VEC> w_raw[kUnroll], x_raw[kUnroll][kTokensPerWarp];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t d = d0 + int64_t{u} * 32 * VEC;
        if (d < a.hidden) {
          w_raw[u] = *reinterpret_cast<const RawVec<T, VEC>*>(w + d);
#pragma unroll
          for (int j = 0; j < kTokensPerWarp; ++j) {
            if (j < tokens) {
              x_raw[u][j] = *reinterpret_cast<const RawVec<T, VEC>*>(x + j * a.x_stride + d);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (d0 + int64_t{u} * 32 * VEC >= a.hidden) break;
        float wv[VEC];
        raw_to_f32<T, VEC>(w_raw[u], wv);
#pragma unroll
        for (int j = 0; j < kTokensPerWarp; ++j) {
          if (j >= tokens) break;
          float xv[VEC];
          raw_to_f32<T, VEC>(x_raw[u][j], xv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[j] = fmaf(wv[i], xv[i], acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kTokensPerWarp; ++j) acc[j] = detail::warp_sum(acc[j]);
  }
  release_next_grid();
  if (work < groups * a.num_experts && lane < tokens) {
    float v = acc[0];
#pragma unroll
    for (int j = 1; j < kTokensPerWarp; ++j) v = lane == j ? acc[j] : v;
    if (a.bias != nullptr) v += detail::to_f32(static_cast<const T*>(a.bias)[e]);
    static_cast<T*>(a.logits)[(t0 + lane) * a.logits_stride + e] = detail::from_f32<T>(v);
  }
}

}  // namespace

void moe_router_logits(const TensorRef& x, const TensorRef& weight, const TensorRef& bias,
                       const TensorRef& logits, void* stream) {
  const int64_t tokens = x.shape[0], experts = weight.shape[0];
  if (tokens == 0) return;
  RouterArgs a{};
  a.x = x.data;
  a.x_stride = x.stride[0];
  a.weight = weight.data;
  a.weight_stride = weight.stride[0];
  a.bias = bias.data;
  a.logits = logits.data;
  a.logits_stride = logits.stride[0];
  a.num_tokens = tokens;
  a.hidden = x.shape[1];
  a.num_experts = static_cast<int32_t>(experts);
  const int64_t warps = (tokens + kTokensPerWarp - 1) / kTokensPerWarp * experts;
  const int64_t ctas = (warps + kWarps - 1) / kWarps;
  if (ctas > 0x7fffffffLL) {
    throw InvalidArgument("moe_router_logits: " + std::to_string(tokens) + " tokens x " +
                          std::to_string(experts) + " experts is too many for one launch");
  }
  const int64_t vec = 16 / static_cast<int64_t>(dtype_size(x.dtype));
  const bool vectorized =
      detail::rows_aligned16(x) && detail::rows_aligned16(weight) && a.hidden % vec == 0;
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(ctas));
  shape.block = dim3(kWarps * 32);
  shape.stream = detail::as_stream(stream);
  shape.after_previous_grid = true;
  MOELORA_DISPATCH_FLOAT(x.dtype, T, {
    if (vectorized) {
      launch_kernel(router_logits_kernel<T, detail::kVec16<T>>, shape, a);
    } else {
      launch_kernel(router_logits_kernel<T, 1>, shape, a);
    }
  });
  detail::check_launch("moe_router_logits");
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
