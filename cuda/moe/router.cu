// moe_router_logits on the GPU (contract: include/moelora/moe.h): logits = round(x W^T + b), the
// router GEMM of decode steps in one launch, where cuBLAS runs a split-K GEMM and its reduction.
//
// Grid mapping: one CTA per (group of kExpertsPerCta experts, group of kTokensPerCta tokens),
// the expert groups varying fastest so that neighbouring CTAs share token rows (through L2). The
// CTA's threads split the hidden dimension: each thread loads its kUnroll 16-byte vectors of
// every weight row and every token row of the CTA before it uses any (scalars when a row or the
// row stride is not 16-byte aligned), so that at gpt-oss-20b's hidden size (360 vectors a row)
// a CTA's reads are one round trip. Each thread keeps float32 partial sums per (expert, token);
// a shuffle reduction per warp and a sum over the warps in shared memory end each dot product.
// The sum order is the threads' (the CPU reference sums in index order), so the two agree to
// float32 rounding before the one rounding to the activation dtype.
// At decode the weights are E x H elements (184 KB for gpt-oss-20b): the kernel costs its
// launch and about one DRAM round trip, and it is launched with PDL so that moe_route, which
// follows it, starts at once.
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
constexpr int kThreads = kWarps * 32;
constexpr int kExpertsPerCta = 4;
constexpr int kTokensPerCta = 4;
constexpr int kUnroll = 2;  // vectors of each row a thread loads before it uses any

struct RouterArgs {
  const void* x;  // [T, H] row stride x_stride
  int64_t x_stride;
  const void* weight;  // [E, H] row stride weight_stride
  int64_t weight_stride;
  const void* bias;  // [E] or null
  void* logits;      // [T, E] row stride logits_stride
  int64_t logits_stride;
  int64_t num_tokens, hidden;
  int32_t num_experts, expert_groups;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) router_logits_kernel(const RouterArgs a) {
  __shared__ float warp_sums[kWarps][kExpertsPerCta * kTokensPerCta];
  wait_for_previous_grid();  // memory only from here (common/launch.cuh)
  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  const int32_t e0 = static_cast<int32_t>(blockIdx.x % a.expert_groups) * kExpertsPerCta;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x / a.expert_groups) * kTokensPerCta;
  const int experts = static_cast<int>(detail::min64(kExpertsPerCta, a.num_experts - e0));
  const int tokens = static_cast<int>(detail::min64(kTokensPerCta, a.num_tokens - t0));
  const T* w = static_cast<const T*>(a.weight) + e0 * a.weight_stride;
  const T* x = static_cast<const T*>(a.x) + t0 * a.x_stride;
  const int64_t vectors = a.hidden / VEC;  // VEC divides the hidden size (checked by the host)
  float acc[kExpertsPerCta][kTokensPerCta] = {};
  for (int64_t v0 = threadIdx.x; v0 < vectors; v0 += int64_t{kThreads} * kUnroll) {
    RawVec<T, VEC> w_raw[kUnroll][kExpertsPerCta], x_raw[kUnroll][kTokensPerCta];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t d = (v0 + int64_t{u} * kThreads) * VEC;
      if (d < a.hidden) {
#pragma unroll
        for (int e = 0; e < kExpertsPerCta; ++e) {
          if (e < experts) {
            w_raw[u][e] = *reinterpret_cast<const RawVec<T, VEC>*>(w + e * a.weight_stride + d);
          }
        }
#pragma unroll
        for (int j = 0; j < kTokensPerCta; ++j) {
          if (j < tokens) {
            x_raw[u][j] = *reinterpret_cast<const RawVec<T, VEC>*>(x + j * a.x_stride + d);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if ((v0 + int64_t{u} * kThreads) * VEC >= a.hidden) break;
#pragma unroll
      for (int j = 0; j < kTokensPerCta; ++j) {
        if (j >= tokens) break;
        float xv[VEC];
        raw_to_f32<T, VEC>(x_raw[u][j], xv);
#pragma unroll
        for (int e = 0; e < kExpertsPerCta; ++e) {
          if (e >= experts) break;
          float wv[VEC];
          raw_to_f32<T, VEC>(w_raw[u][e], wv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[e][j] = fmaf(wv[i], xv[i], acc[e][j]);
        }
      }
    }
  }
  release_next_grid();
#pragma unroll
  for (int e = 0; e < kExpertsPerCta; ++e) {
#pragma unroll
    for (int j = 0; j < kTokensPerCta; ++j) {
      const float sum = detail::warp_sum(acc[e][j]);
      if (lane == 0) warp_sums[warp][e * kTokensPerCta + j] = sum;
    }
  }
  __syncthreads();
  const int e = static_cast<int>(threadIdx.x) / kTokensPerCta;
  const int j = static_cast<int>(threadIdx.x) % kTokensPerCta;
  if (e < experts && j < tokens) {
    float v = 0.0f;
#pragma unroll
    for (int r = 0; r < kWarps; ++r) v += warp_sums[r][threadIdx.x];
    if (a.bias != nullptr) v += detail::to_f32(static_cast<const T*>(a.bias)[e0 + e]);
    static_cast<T*>(a.logits)[(t0 + j) * a.logits_stride + e0 + e] = detail::from_f32<T>(v);
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
  a.expert_groups = static_cast<int32_t>((experts + kExpertsPerCta - 1) / kExpertsPerCta);
  const int64_t ctas = (tokens + kTokensPerCta - 1) / kTokensPerCta * a.expert_groups;
  if (ctas > 0x7fffffffLL) {
    throw InvalidArgument("moe_router_logits: " + std::to_string(tokens) + " tokens x " +
                          std::to_string(experts) + " experts is too many for one launch");
  }
  const int64_t vec = 16 / static_cast<int64_t>(dtype_size(x.dtype));
  const bool vectorized =
      detail::rows_aligned16(x) && detail::rows_aligned16(weight) && a.hidden % vec == 0;
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(ctas));
  shape.block = dim3(kThreads);
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
