// The fused MoE layer's ops: routing, the expert GEMMs over weights kept as stored (dense,
// MXFP4, block-scaled FP8), the gated activation and the sum over top-k. Same conventions as
// moelora/ops.h: views of caller-owned tensors, outputs written only where stated, the CPU
// reference (src/kernels/moe_*_cpu.cpp) defines the semantics and the CUDA kernels (cuda/moe/)
// follow them; `stream` is a cudaStream_t, ignored on the CPU.
//
// Notation: T tokens, E experts, K = top_k, P = T*K pairs (pair p = t*K + k), H hidden,
// I expert width. One layer on a GPU is five launches:
//   moe_router_logits(x)                         -> router logits [T, E]
//   moe_route(router logits) -> topk_ids, topk_weights, expert blocks
//   moe_expert_gemm(x, w13, activation)          -> h [P, I]   (or h13 [P, 2I] + moe_activation)
//   moe_expert_gemm(h, w2, topk_weights)         -> y [P, H]   weighted
//   moe_sum(y)                                   -> out [T, H]
// FP8 and MXFP4 payloads cross the boundary as uint8 tensors (their bytes).
#pragma once

#include <cstdint>

#include "moelora/tensor_ref.h"

namespace moelora {

enum class MoeRouting : uint8_t {
  kSoftmaxTopk = 0,  // softmax over all E logits (float32), then top-k (Mixtral, Qwen, OLMoE)
  kTopkSoftmax = 1,  // top-k logits, then softmax over those K (GPT-OSS)
};

enum class MoeWeightFormat : uint8_t {
  kDense = 0,     // weight [E, N, K] in the activations' dtype
  kMxfp4 = 1,     // OCP MXFP4 as GPT-OSS stores it (see MoeExpertWeights)
  kFp8Block = 2,  // float8 e4m3fn with float32 scales over block_n x block_k tiles
};

// How an MXFP4 stack holds its codes (every op reads every layout, but the stream kernel of
// moe_expert_gemm refuses tiles).
enum class MoeMxfp4Layout : uint8_t {
  kCheckpoint = 0,  // as GPT-OSS stores them: element 2j in the low nibble of byte j
  kMma = 1,         // the bits of each little-endian 32-bit word (elements 8u..8u+7) permuted
                    // so that the tensor-core kernels decode them with fewer instructions
                    // (src/mxfp4_layout.h; moelora.ops.moe.mxfp4_to_mma_layout repacks)
  kMmaTiled = 2,    // kMma's words in tiles of 16 weight rows, k-step-major, so that a warp of
                    // the tiled kernel reads a k-step of its 16 rows as one contiguous KB
                    // (shapes in MoeExpertWeights; moelora.ops.moe.mxfp4_to_tiled_layout)
};

enum class MoeActivation : uint8_t {
  kNone = 0,    // output = the N columns as computed
  kSilu = 1,    // gated: silu(gate) * up over the halves [gate | up] of the N rows; N/2 columns
  kGptOss = 2,  // gated: gate = min(gate, limit), up = clamp(up, +-limit),
                //        (up + 1) * gate * sigmoid(alpha * gate)
};

// Which kernel family the GPU uses. kAuto: the tensor-core kernel when it takes the call, else
// the simple one (moelora.ops.moe's plan picks explicitly, with fall_back). Ignored on the CPU.
enum class MoeGemmKernel : uint8_t {
  kAuto = 0,
  kSimple = 1,      // one warp per output element: any dtype, format and alignment
  kTensorCore = 2,  // mma.sync tiles, one CTA per (row tile, block): bfloat16 / float16 with
                    // 16-byte aligned rows; block_m 8, 16, 32 or 64
  kStream = 3,      // persistent, one CTA per SM, weights streamed by bulk copies (decode):
                    // as kTensorCore, block_m 8 or 16, sm_90+, x rows fitting shared memory
};

constexpr int32_t kMoeMaxStreamConsumers = 12;
constexpr int32_t kMoeMaxGemmSplits = 16;

// Typed overrides of the step's plan for moe_expert_gemm (tests and benchmarks set them).
struct MoeGemmOptions {
  MoeGemmKernel kernel = MoeGemmKernel::kAuto;
  // a kernel that cannot take the call: false, an InvalidArgument naming why; true, the kAuto
  // choice runs instead
  bool fall_back = false;
  int32_t stream_consumers = 0;  // kStream's consumer warps, 1..kMoeMaxStreamConsumers; 0: its
                                 // choice per format
  // Split-K of kTensorCore, 1..kMoeMaxGemmSplits: CTAs of each (row tile, block) take
  // contiguous ranges of K (whole 128-element x stages, so fewer splits run where K is short)
  // and a finishing kernel adds their float32 sums in a fixed order (the same bits on every
  // run) and applies the epilogue. For decode grids too small to fill the GPU: block_m 8, 16
  // or 32. kSimple and kStream take 1; the simple kernel that kAuto or fall_back picks
  // ignores it.
  int32_t splits = 1;
  // optional float32 scratch for the splits' sums, contiguous, on the input's device, at
  // least splits * P * N elements (N: the weight rows); absent: stream-ordered scratch
  TensorRef workspace;
};

// One expert stack W [E, N, K] (N outputs, K inputs) as stored:
//   kDense     weight  [E, N, K] float32 / float16 / bfloat16 (the activations' dtype)
//   kMxfp4     weight  uint8 [E, N, K/32, 16]: 32 E2M1 codes per block, two a byte, low
//                      nibble first (element 2j in the low nibble of byte j)
//              scales  uint8 [E, N, K/32]: E8M0 exponents, W = e2m1 * 2^(scale - 127)
//              mxfp4_layout: the checkpoint's nibbles or the mma layout (MoeMxfp4Layout)
//              kMmaTiled: weight uint8 [E, N/16, S, 16, 64] and scales uint8 [E, N/16, S, 16, 4]
//                      (S = ceil(K/128) k-steps of 64 bytes a row, four blocks of 32 codes):
//                      block g of row n at [e, n/16, g/4, n%16, 16 (g%4)..], its scale at
//                      [e, n/16, g/4, n%16, g%4]; codes past K are 0, their scales 127. The
//                      last three dimensions are contiguous.
//   kFp8Block  weight  uint8 [E, N, K]: float8 e4m3fn bit patterns
//              scales  float32 [E, ceil(N/block_n), ceil(K/block_k)]:
//                      W[e, n, k] = fp8 * scales[e, n / block_n, k / block_k]
// Dequantized elements are rounded to the activations' dtype (MXFP4 elements are exact there,
// FP8 ones are what models/quantized.py's dequantization gives). Every dimension but the last
// may be strided; the last must be contiguous. bias: optional float [E, N] (any float dtype).
struct MoeExpertWeights {
  MoeWeightFormat format = MoeWeightFormat::kDense;
  TensorRef weight;
  TensorRef scales;
  TensorRef bias;
  int32_t block_n = 0;  // kFp8Block only
  int32_t block_k = 0;  // kFp8Block only
  MoeMxfp4Layout mxfp4_layout = MoeMxfp4Layout::kCheckpoint;  // kMxfp4 only

  // N, the weight rows, in any format and layout.
  int64_t rows() const {
    return mxfp4_layout == MoeMxfp4Layout::kMmaTiled ? weight.shape[1] * 16 : weight.shape[1];
  }
};

// What moe_expert_gemm does to each output row after the product, in this order: + bias[e],
// the activation (gated: N/2 output columns), times topk_weights[p] when given, one rounding to
// the output dtype. Accumulation is float32.
struct MoeEpilogue {
  MoeActivation activation = MoeActivation::kNone;
  float swiglu_alpha = 1.702f;
  float swiglu_limit = 7.0f;
  TensorRef topk_weights;  // optional float32 [P]
};

// ---- moe_router_logits -------------------------------------------------------------------------
// The router GEMM: logits[t, e] = round(sum_h x[t, h] * weight[e, h] + bias[e]), the sum in
// float32, one rounding to the activation dtype (as a GEMM with a bias epilogue rounds). The GPU
// kernel is for decode steps (tens of tokens), one launch where a library GEMM splits K and
// reduces in a second; its float32 sums may differ from the CPU reference's in the last bits.
//   x       [T, H] float32 / float16 / bfloat16, strided rows, contiguous last dimension
//   weight  [E, H] the dtype of x, strided rows, contiguous last dimension
//   bias    optional [E] contiguous, the dtype of x
//   logits  [T, E] out, the dtype of x, strided rows, contiguous last dimension
void moe_router_logits(const TensorRef& x, const TensorRef& weight, const TensorRef& bias,
                       const TensorRef& logits, void* stream);

// ---- moe_route ---------------------------------------------------------------------------------
// Top-k routing and the expert grouping of the pairs, in one pass with fixed-size outputs (no
// host sync: a decode step that calls it can be captured in a CUDA graph).
//   router_logits  [T, E] float32 / float16 / bfloat16, last dimension contiguous
//   topk_ids       int32 [T, K] out: experts of each token, largest logit first; equal logits
//                  go to the lower expert id first; NaN ranks below every number
//   topk_weights   float32 [T, K] out: kSoftmaxTopk: softmax over all E logits of the selected,
//                  divided by their sum when renormalize; kTopkSoftmax: softmax over the K
//                  selected logits (renormalize changes nothing)
//   sorted_pairs   int32 [max_blocks * block_m] out: pair ids grouped by expert (experts in
//                  increasing order), each expert's rows padded to a multiple of block_m with -1,
//                  -1 past num_blocks * block_m. The CPU orders each expert's pairs by pair id;
//                  a GPU kernel may order them freely (no result depends on it).
//   block_expert   int32 [max_blocks] out: expert of each block of block_m rows, -1 past
//                  num_blocks
//   num_blocks     int32 [1] out
//   expert_counts  int32 [E] out: pairs routed to each expert
//   workspace      optional, on the logits' device, at least moe_route_workspace_bytes: the GPU
//                  form for large steps keeps its counters there (without it, stream-ordered
//                  scratch). Ignored on the CPU.
// max_blocks = moe_route_max_blocks(P, E, block_m); sorted_pairs and block_expert may be longer.
// 1 <= K <= E <= kMoeMaxExperts.
constexpr int32_t kMoeMaxExperts = 512;
int64_t moe_route_max_blocks(int64_t num_pairs, int32_t num_experts, int32_t block_m);
int64_t moe_route_workspace_bytes(int64_t num_tokens, int32_t num_experts, DeviceKind device);
void moe_route(const TensorRef& router_logits, int32_t top_k, MoeRouting routing,
               bool renormalize, int32_t block_m, const TensorRef& topk_ids,
               const TensorRef& topk_weights, const TensorRef& sorted_pairs,
               const TensorRef& block_expert, const TensorRef& num_blocks,
               const TensorRef& expert_counts, void* stream,
               const TensorRef& workspace = TensorRef{});

// ---- moe_expert_gemm ---------------------------------------------------------------------------
// For every block b < num_blocks (expert e = block_expert[b]) and pair p in its rows:
//   acc[n]      = sum_k input[p / input_pairs_per_row, k] * W[e, n, k]           (float32)
//   output[p, :] = epilogue(acc + bias[e])                       (see MoeEpilogue)
//   w13: input = x [T, H], input_pairs_per_row = K, output h [P, I] (gated) or h13 [P, 2I]
//   w2:  input = h [P, I], input_pairs_per_row = 1, output y [P, H], topk_weights given
// Rows are read by index: no gathered copy of the activations. Output rows of pairs in no block
// are not written. input/output: float32, float16 or bfloat16, the same dtype, 2-D with a
// contiguous last dimension. sorted_pairs / block_expert / num_blocks as moe_route writes them.
// options: the kernel (MoeGemmKernel) and its overrides, see MoeGemmOptions.
void moe_expert_gemm(const TensorRef& input, int32_t input_pairs_per_row,
                     const MoeExpertWeights& weights, const TensorRef& sorted_pairs,
                     const TensorRef& block_expert, const TensorRef& num_blocks, int32_t block_m,
                     const MoeEpilogue& epilogue, const TensorRef& output, void* stream,
                     const MoeGemmOptions& options = MoeGemmOptions{});

// ---- moe_dequantize ----------------------------------------------------------------------------
// The dense form of experts [first_expert, first_expert + out.shape[0]) of a stack, exactly as
// moe_expert_gemm sees them (dequantized, rounded to out's dtype): for a grouped GEMM at
// prefill, where many rows per expert make one more pass over the weights cheaper than
// dequantizing them inside the GEMM for every block.
//   out [count, N, K] float32 / float16 / bfloat16, contiguous, on the weights' device; a dense
//       stack must have out's dtype (the op is then a copy).
void moe_dequantize(const MoeExpertWeights& weights, int64_t first_expert, const TensorRef& out,
                    void* stream);

// ---- moe_activation ----------------------------------------------------------------------------
// h[p, j] = act(g, u) with g = h13[p, j] + a[p, j], u = h13[p, I + j] + a[p, I + j] for the gated
// activations (float32 math, one rounding): the unfused form, for when a LoRA delta goes into
// h13 first. The delta may come as `addend` (a [P, 2I] tensor computed apart, e.g. beside the
// GEMM that wrote h13), added in float32; absent, a = 0.
//   h13 [P, 2I], h [P, I], addend: float32 / float16 / bfloat16, one dtype, contiguous last
//   dimension.
void moe_activation(const TensorRef& h13, MoeActivation activation, float swiglu_alpha,
                    float swiglu_limit, const TensorRef& h, void* stream,
                    const TensorRef& addend = TensorRef{});

// ---- moe_sum -----------------------------------------------------------------------------------
// out[t, :] = sum_{k < K} (y[t*K + k, :] + addend[t*K + k, :]), in float32, k in increasing
// order, one rounding; addend optional ([T*K, H], a weighted LoRA delta computed apart).
//   y [T*K, H], out [T, H], addend: same float dtype, contiguous last dimension.
void moe_sum(const TensorRef& y, int32_t top_k, const TensorRef& out, void* stream,
             const TensorRef& addend = TensorRef{});

}  // namespace moelora
