// Internal: the per-device implementations behind the ops of moelora/moe.h. moe_ops.cpp checks
// the arguments once (shapes, dtypes, devices), then calls cpu::<op> for host tensors or
// cuda::<op> for device tensors. Both take validated arguments; the CPU kernels also check the
// ids they read (a bad id is an InvalidArgument there; the GPU kernels skip it).
#pragma once

#include <cmath>
#include <cstdint>

#include "moelora/moe.h"

namespace moelora {

namespace cpu {

void moe_router_logits(const TensorRef& x, const TensorRef& weight, const TensorRef& bias,
                       const TensorRef& logits);
void moe_route(const TensorRef& router_logits, int32_t top_k, MoeRouting routing,
               bool renormalize, int32_t block_m, const TensorRef& topk_ids,
               const TensorRef& topk_weights, const TensorRef& sorted_pairs,
               const TensorRef& block_expert, const TensorRef& num_blocks,
               const TensorRef& expert_counts);
void moe_expert_gemm(const TensorRef& input, int32_t input_pairs_per_row,
                     const MoeExpertWeights& weights, const TensorRef& sorted_pairs,
                     const TensorRef& block_expert, const TensorRef& num_blocks, int32_t block_m,
                     const MoeEpilogue& epilogue, const TensorRef& output);
void moe_dequantize(const MoeExpertWeights& weights, int64_t first_expert, const TensorRef& out);
void moe_activation(const TensorRef& h13, MoeActivation activation, float swiglu_alpha,
                    float swiglu_limit, const TensorRef& h, const TensorRef& addend);
void moe_sum(const TensorRef& y, int32_t top_k, const TensorRef& out, const TensorRef& addend);

}  // namespace cpu

#ifdef MOELORA_WITH_CUDA
namespace cuda {

void moe_router_logits(const TensorRef& x, const TensorRef& weight, const TensorRef& bias,
                       const TensorRef& logits, void* stream);
size_t moe_route_workspace_bytes(int64_t num_tokens, int32_t num_experts);
void moe_route(const TensorRef& router_logits, int32_t top_k, MoeRouting routing,
               bool renormalize, int32_t block_m, const TensorRef& topk_ids,
               const TensorRef& topk_weights, const TensorRef& sorted_pairs,
               const TensorRef& block_expert, const TensorRef& num_blocks,
               const TensorRef& expert_counts, void* stream, const TensorRef& workspace);
void moe_expert_gemm(const TensorRef& input, int32_t input_pairs_per_row,
                     const MoeExpertWeights& weights, const TensorRef& sorted_pairs,
                     const TensorRef& block_expert, const TensorRef& num_blocks, int32_t block_m,
                     const MoeEpilogue& epilogue, const TensorRef& output, void* stream,
                     const MoeGemmOptions& options);
void moe_dequantize(const MoeExpertWeights& weights, int64_t first_expert, const TensorRef& out,
                    void* stream);
void moe_activation(const TensorRef& h13, MoeActivation activation, float swiglu_alpha,
                    float swiglu_limit, const TensorRef& h, void* stream,
                    const TensorRef& addend);
void moe_sum(const TensorRef& y, int32_t top_k, const TensorRef& out, void* stream,
             const TensorRef& addend);

}  // namespace cuda
#endif

// The math every implementation shares, on floats (host and device).
namespace moe_math {

#if defined(__CUDACC__)
#define MOELORA_MOE_HD __host__ __device__ __forceinline__
#else
#define MOELORA_MOE_HD inline
#endif

// The gated activations of MoeActivation on float32 gate and up values.
MOELORA_MOE_HD float silu_glu(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }
// Clamps written as comparisons so that NaN passes through, as torch.clamp lets it.
MOELORA_MOE_HD float gpt_oss_glu(float gate, float up, float alpha, float limit) {
  gate = gate > limit ? limit : gate;
  up = up > limit ? limit : (up < -limit ? -limit : up);
  return (up + 1.0f) * (gate / (1.0f + expf(-alpha * gate)));
}

}  // namespace moe_math

}  // namespace moelora
