// The decoder layer's own ops around attention and the MLP: RMSNorm, the residual add fused into
// it, and rotary embeddings fused with the paged KV-cache write. Same contract as moelora/ops.h:
// views of caller-owned tensors, outputs given by the caller, the CPU reference in src/kernels/
// (the semantics) or the CUDA kernel in cuda/layer/ when the tensors are on a GPU; `stream` is a
// cudaStream_t (nullptr = the default stream), ignored on the CPU.
//
// Notation: T tokens, H hidden size, Hq query heads, Hkv KV heads, D head_dim. Activations are
// float32, float16 or bfloat16; all math is float32, rounded to the activation dtype where the
// torch models round (noted per op).
#pragma once

#include <cstdint>

#include "moelora/ops.h"
#include "moelora/tensor_ref.h"

namespace moelora {

// ---- RMSNorm -----------------------------------------------------------------------------------
// out[t] = norm(x[t]) * weight with norm(h) = h / sqrt(mean(h^2) + eps), h in float32.
//   input   [T, H]   rows may be strided, last dimension contiguous
//   weight  [H]      contiguous; its dtype picks the rounding, as the HF models do:
//                    the activation dtype: out = round(weight * round(norm(h)))   (Llama, Qwen)
//                    float32 (activations 16-bit): out = round(weight * norm(h))  (GPT-OSS)
//   out     [T, H]   the activation dtype; may be `input` itself
void rms_norm(const TensorRef& input, const TensorRef& weight, float eps, const TensorRef& out,
              void* stream);

// The residual add fused into the next norm (vLLM's fused_add_rms_norm):
//   residual[t] = round(residual[t] + input[t]);  out[t] = rms_norm(residual[t])
// residual is updated in place; it must not share memory with input or out. out may be input.
//   input, residual, out  [T, H]  one activation dtype, strided rows allowed
void add_rms_norm(const TensorRef& input, const TensorRef& residual, const TensorRef& weight,
                  float eps, const TensorRef& out, void* stream);

// ---- rotary embeddings (+ per-head q/k norm) + paged KV-cache write ----------------------------
// For token t at position p = positions[t], pair i < D/2 of a head:
//   f = float(p) * inv_freq[i];  c = cos(f) * attention_scaling;  s = sin(f) * attention_scaling
//   x'[i] = x[i] * c - x[i + D/2] * s;  x'[i + D/2] = x[i + D/2] * c + x[i] * s  (rotate-half,
//   products and the sum each rounded to float32, so float32 runs match torch's formula), then
//   rounded once to the activation dtype. With q_norm / k_norm (Qwen3's per-head RMSNorm, weight
//   [D] in the activation dtype), each head is first replaced by round(w * round(norm(head))).
// Query and key heads are rotated in place (the key as it is also written to the cache, so a
// prefill can attend to this step's keys from `key` directly).
//   query     [T, Hq, D], key [T, Hkv, D]: strided rows and heads, last dimension contiguous
//   positions int64 [T]
//   inv_freq  float32 [D/2] contiguous (default, llama3 or YaRN frequencies)
//   q_norm, k_norm  both absent or both [D] contiguous, activation dtype
// D is even and at most kRopeMaxHeadDim.
constexpr int32_t kRopeMaxHeadDim = 256;

void rope_qk(const TensorRef& query, const TensorRef& key, const TensorRef& positions,
             const TensorRef& inv_freq, float attention_scaling, const TensorRef& q_norm,
             const TensorRef& k_norm, float norm_eps, void* stream);

// rope_qk, and each token's rotated key and its value written into cache slot slot_mapping[t]
// (page slot / block_tokens, offset slot % block_tokens; layout in moelora/ops.h). Slot -1 skips
// the cache write (the token's query and key are still rotated); other negative slots are
// InvalidArgument on the CPU and skipped on the GPU.
//   value         [T, Hkv, D] like key (not modified)
//   slot_mapping  int64 [T]
//   cache         dtype of the activations, num_kv_heads Hkv, head_dim D
void rope_kv_write(const TensorRef& query, const TensorRef& key, const TensorRef& value,
                   const TensorRef& positions, const TensorRef& inv_freq, float attention_scaling,
                   const TensorRef& q_norm, const TensorRef& k_norm, float norm_eps,
                   const TensorRef& slot_mapping, const KvCacheView& cache, void* stream);

}  // namespace moelora
