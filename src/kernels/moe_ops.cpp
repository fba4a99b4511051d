// The public ops of moelora/moe.h: check the arguments once (so the CPU and CUDA paths reject the
// same calls), then run on the device of the tensors.
#include <algorithm>
#include <limits>
#include <string>

#include "kernels/moe_kernels.h"
#include "kernels/validate.h"
#include "moelora/error.h"

namespace moelora {

using namespace kernels;

namespace {

// A 2-D float matrix of rows with a contiguous last dimension.
void check_matrix(const TensorRef& t, const char* op, const char* arg) {
  check_float_dtype(t, op, arg);
  check_ndim(t, 2, op, arg);
  check_last_dim_contiguous(t, op, arg);
  check_has_data(t, op, arg);
}

// A contiguous int32 vector of `length` entries (any length when length < 0).
void check_ids(const TensorRef& t, int64_t length, const TensorRef& device_of, const char* op,
               const char* arg) {
  check_dtype(t, DType::kInt32, op, arg);
  check_ndim(t, 1, op, arg);
  check_has_data(t, op, arg);
  if (!t.is_contiguous()) throw_invalid(op, std::string(arg) + " must be contiguous");
  if (length >= 0) check_size(t, 0, length, op, arg, "see moelora/moe.h");
  check_same_device(device_of, t, op, "the activations", arg);
}

// sorted_pairs [len(block_expert) * block_m], block_expert [>= 1], num_blocks [1].
void check_blocks(const TensorRef& sorted_pairs, const TensorRef& block_expert,
                  const TensorRef& num_blocks, int32_t block_m, const TensorRef& device_of,
                  const char* op) {
  check_block_m(block_m, op);
  check_ids(block_expert, -1, device_of, op, "block_expert");
  if (block_expert.shape[0] < 1) throw_invalid(op, "block_expert must hold at least one block");
  check_ids(sorted_pairs, block_expert.shape[0] * block_m, device_of, op, "sorted_pairs");
  check_ids(num_blocks, 1, device_of, op, "num_blocks");
}

bool gated(MoeActivation activation, const char* op) {
  switch (activation) {
    case MoeActivation::kNone: return false;
    case MoeActivation::kSilu:
    case MoeActivation::kGptOss: return true;
  }
  throw_invalid(op, "activation must be none, silu or gpt_oss, got code " +
                        std::to_string(static_cast<int>(activation)));
}

// The stored expert weights against the activations: returns N.
// MXFP4 in the tiled layout: weight [E, N/16, S, 16, 64], scales [E, N/16, S, 16, 4], the last
// three dimensions of each contiguous (moelora/moe.h).
void check_mxfp4_tiles(const MoeExpertWeights& w, int64_t k_dim, const char* op) {
  const TensorRef& wt = w.weight;
  const int64_t steps = (k_dim + 127) / 128;
  check_ndim(wt, 5, op, "weight");
  check_size(wt, 2, steps, op, "weight", "ceil(input width / 128) k-steps");
  check_size(wt, 3, 16, op, "weight", "16 rows per tile");
  check_size(wt, 4, 64, op, "weight", "64 bytes per row and k-step");
  check_ndim(w.scales, 5, op, "scales");
  check_size(w.scales, 0, wt.shape[0], op, "scales", "one per expert");
  check_size(w.scales, 1, wt.shape[1], op, "scales", "one tile per weight tile");
  check_size(w.scales, 2, steps, op, "scales", "the weight's k-steps");
  check_size(w.scales, 3, 16, op, "scales", "16 rows per tile");
  check_size(w.scales, 4, 4, op, "scales", "4 blocks per row and k-step");
  // A dimension of one index may have any stride (torch gives one k-step the tile's).
  const bool steps_packed = steps == 1 || (wt.stride[2] == 1024 && w.scales.stride[2] == 64);
  if (wt.stride[3] != 64 || w.scales.stride[4] != 1 || w.scales.stride[3] != 4 ||
      !steps_packed) {
    throw_invalid(op, "MXFP4 tiles must be contiguous in their last three dimensions, got "
                      "weight " + wt.describe() + " and scales " + w.scales.describe());
  }
}

int64_t check_expert_weights(const MoeExpertWeights& w, const TensorRef& input, const char* op) {
  const TensorRef& wt = w.weight;
  const int64_t k_dim = input.shape[1];
  check_has_data(wt, op, "weight");
  check_last_dim_contiguous(wt, op, "weight");
  check_same_device(input, wt, op, "input", "weight");
  switch (w.format) {
    case MoeWeightFormat::kDense:
      check_ndim(wt, 3, op, "weight");
      if (wt.dtype != input.dtype) {
        throw_invalid(op, std::string("dense weight must have the input's dtype ") +
                              dtype_name(input.dtype) + ", got " + wt.describe());
      }
      check_size(wt, 2, k_dim, op, "weight", "the input width");
      if (!is_absent(w.scales)) throw_invalid(op, "dense weights take no scales");
      break;
    case MoeWeightFormat::kMxfp4:
      check_dtype(wt, DType::kUInt8, op, "weight");
      if (k_dim % 32 != 0) {
        throw_invalid(op, "MXFP4 needs an input width that is a multiple of 32, got " +
                              std::to_string(k_dim));
      }
      check_dtype(w.scales, DType::kUInt8, op, "scales");
      check_has_data(w.scales, op, "scales");
      if (w.mxfp4_layout == MoeMxfp4Layout::kMmaTiled) {
        check_mxfp4_tiles(w, k_dim, op);
      } else if (w.mxfp4_layout == MoeMxfp4Layout::kCheckpoint ||
                 w.mxfp4_layout == MoeMxfp4Layout::kMma) {
        check_ndim(wt, 4, op, "weight");
        check_size(wt, 2, k_dim / 32, op, "weight", "input width / 32 blocks");
        check_size(wt, 3, 16, op, "weight", "16 bytes per block of 32 codes");
        check_ndim(w.scales, 3, op, "scales");
        check_size(w.scales, 0, wt.shape[0], op, "scales", "one per expert");
        check_size(w.scales, 1, wt.shape[1], op, "scales", "one per weight row");
        check_size(w.scales, 2, k_dim / 32, op, "scales", "one per block of 32");
      } else {
        throw_invalid(op, "unknown MXFP4 layout code " +
                              std::to_string(static_cast<int>(w.mxfp4_layout)));
      }
      check_same_device(input, w.scales, op, "input", "scales");
      break;
    case MoeWeightFormat::kFp8Block: {
      check_dtype(wt, DType::kUInt8, op, "weight");
      check_ndim(wt, 3, op, "weight");
      check_size(wt, 2, k_dim, op, "weight", "the input width");
      if (w.block_n <= 0 || w.block_k <= 0) {
        throw_invalid(op, "FP8 block sizes must be positive, got " + std::to_string(w.block_n) +
                              " x " + std::to_string(w.block_k));
      }
      check_dtype(w.scales, DType::kFloat32, op, "scales");
      check_ndim(w.scales, 3, op, "scales");
      check_has_data(w.scales, op, "scales");
      check_last_dim_contiguous(w.scales, op, "scales");
      check_size(w.scales, 0, wt.shape[0], op, "scales", "one per expert");
      check_size(w.scales, 1, (wt.shape[1] + w.block_n - 1) / w.block_n, op, "scales",
                 "ceil(N / block_n)");
      check_size(w.scales, 2, (k_dim + w.block_k - 1) / w.block_k, op, "scales",
                 "ceil(K / block_k)");
      check_same_device(input, w.scales, op, "input", "scales");
      break;
    }
    default:
      throw_invalid(op, "unknown weight format code " + std::to_string(static_cast<int>(w.format)));
  }
  if (w.format != MoeWeightFormat::kMxfp4 && w.mxfp4_layout != MoeMxfp4Layout::kCheckpoint) {
    throw_invalid(op, "an MXFP4 layout applies to MXFP4 weights only");
  }
  if (!is_absent(w.bias)) {
    check_float_dtype(w.bias, op, "bias");
    check_ndim(w.bias, 2, op, "bias");
    check_has_data(w.bias, op, "bias");
    check_size(w.bias, 0, wt.shape[0], op, "bias", "one row per expert");
    check_size(w.bias, 1, w.rows(), op, "bias", "one per weight row");
    check_same_device(input, w.bias, op, "input", "bias");
  }
  return w.rows();
}

// MoeGemmOptions::splits and its workspace; `partial_floats` = P * N.
void check_splits(const MoeGemmOptions& options, int64_t partial_floats, int32_t block_m,
                  const TensorRef& input, const char* op) {
  const int32_t splits = options.splits;
  if (splits < 1 || splits > kMoeMaxGemmSplits) {
    throw_invalid(op, "splits must be in [1, " + std::to_string(kMoeMaxGemmSplits) + "], got " +
                          std::to_string(splits));
  }
  if (splits > 1 && (options.kernel == MoeGemmKernel::kSimple ||
                     options.kernel == MoeGemmKernel::kStream)) {
    throw_invalid(op, "splits > 1 is the tensor-core kernel's split-K; the " +
                          std::string(options.kernel == MoeGemmKernel::kSimple ? "simple"
                                                                               : "stream") +
                          " kernel takes splits = 1, got " + std::to_string(splits));
  }
  if (splits > 1 && block_m > 32) {
    throw_invalid(op, "splits > 1 runs with block_m 8, 16 or 32 (the decode shapes), got block_m " +
                          std::to_string(block_m));
  }
  const TensorRef& w = options.workspace;
  if (is_absent(w)) return;
  check_dtype(w, DType::kFloat32, op, "workspace");
  check_has_data(w, op, "workspace");
  if (!w.is_contiguous()) throw_invalid(op, "workspace must be contiguous, got " + w.describe());
  check_same_device(input, w, op, "input", "workspace");
  if (w.numel() < splits * partial_floats) {
    throw_invalid(op, "workspace must hold splits * pairs * weight rows = " +
                          std::to_string(splits * partial_floats) + " float32, got " +
                          w.describe());
  }
}

}  // namespace

int64_t moe_route_max_blocks(int64_t num_pairs, int32_t num_experts, int32_t block_m) {
  constexpr const char* op = "moe_route_max_blocks";
  if (num_pairs < 0 || num_experts <= 0) {
    throw_invalid(op, "num_pairs must be >= 0 and num_experts positive, got " +
                          std::to_string(num_pairs) + " and " + std::to_string(num_experts));
  }
  check_block_m(block_m, op);
  // Each non-empty expert pads at most block_m - 1 rows; at least one block, so that no output
  // is ever empty.
  const int64_t groups = std::min<int64_t>(num_pairs, num_experts);
  return std::max<int64_t>(1, (num_pairs + groups * (block_m - 1)) / block_m);
}

int64_t moe_route_workspace_bytes(int64_t num_tokens, int32_t num_experts, DeviceKind device) {
  constexpr const char* op = "moe_route_workspace_bytes";
  if (num_tokens < 0 || num_experts <= 0 || num_experts > kMoeMaxExperts) {
    throw_invalid(op, "num_tokens must be >= 0 and num_experts in [1, " +
                          std::to_string(kMoeMaxExperts) + "]");
  }
  if (device != DeviceKind::kCUDA) return 0;
#ifdef MOELORA_WITH_CUDA
  return static_cast<int64_t>(cuda::moe_route_workspace_bytes(num_tokens, num_experts));
#else
  no_cuda_kernel(op);
#endif
}

void moe_router_logits(const TensorRef& x, const TensorRef& weight, const TensorRef& bias,
                       const TensorRef& logits, void* stream) {
  constexpr const char* op = "moe_router_logits";
  check_matrix(x, op, "x");
  check_matrix(weight, op, "weight");
  check_matrix(logits, op, "logits");
  for (const auto* t : {&weight, &logits}) {
    const char* arg = t == &weight ? "weight" : "logits";
    if (t->dtype != x.dtype) {
      throw_invalid(op, std::string(arg) + " must have the dtype of x, " +
                            dtype_name(x.dtype) + ", got " + t->describe());
    }
    check_same_device(x, *t, op, "x", arg);
  }
  if (weight.shape[0] < 1) {
    throw_invalid(op, "weight needs a row per expert, got " + weight.describe());
  }
  check_size(weight, 1, x.shape[1], op, "weight", "the hidden size of x");
  check_size(logits, 0, x.shape[0], op, "logits", "one row per token of x");
  check_size(logits, 1, weight.shape[0], op, "logits", "one column per expert (row of weight)");
  if (!is_absent(bias)) {
    if (bias.dtype != x.dtype) {
      throw_invalid(op, std::string("bias must have the dtype of x, ") + dtype_name(x.dtype) +
                            ", got " + bias.describe());
    }
    check_ndim(bias, 1, op, "bias");
    check_size(bias, 0, weight.shape[0], op, "bias", "one entry per expert");
    check_has_data(bias, op, "bias");
    if (!bias.is_contiguous()) throw_invalid(op, "bias must be contiguous, got " + bias.describe());
    check_same_device(x, bias, op, "x", "bias");
  }
  if (on_cuda(x)) {
#ifdef MOELORA_WITH_CUDA
    return cuda::moe_router_logits(x, weight, bias, logits, stream);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::moe_router_logits(x, weight, bias, logits);
}

void moe_route(const TensorRef& router_logits, int32_t top_k, MoeRouting routing,
               bool renormalize, int32_t block_m, const TensorRef& topk_ids,
               const TensorRef& topk_weights, const TensorRef& sorted_pairs,
               const TensorRef& block_expert, const TensorRef& num_blocks,
               const TensorRef& expert_counts, void* stream, const TensorRef& workspace) {
  constexpr const char* op = "moe_route";
  check_matrix(router_logits, op, "router_logits");
  const int64_t num_tokens = router_logits.shape[0];
  const int64_t num_experts = router_logits.shape[1];
  if (num_experts < 1 || num_experts > kMoeMaxExperts) {
    throw_invalid(op, "router_logits must have 1 to " + std::to_string(kMoeMaxExperts) +
                          " experts (columns), got " + router_logits.describe());
  }
  if (top_k < 1 || top_k > num_experts) {
    throw_invalid(op, "top_k must be in [1, " + std::to_string(num_experts) + "], got " +
                          std::to_string(top_k));
  }
  if (routing != MoeRouting::kSoftmaxTopk && routing != MoeRouting::kTopkSoftmax) {
    throw_invalid(op, "unknown routing code " + std::to_string(static_cast<int>(routing)));
  }
  const int64_t num_pairs = num_tokens * top_k;
  if (num_pairs > std::numeric_limits<int32_t>::max()) {
    throw_invalid(op, "at most 2^31 - 1 pairs, got " + std::to_string(num_pairs));
  }
  for (const auto* t : {&topk_ids, &topk_weights}) {
    const char* arg = t == &topk_ids ? "topk_ids" : "topk_weights";
    check_dtype(*t, t == &topk_ids ? DType::kInt32 : DType::kFloat32, op, arg);
    check_ndim(*t, 2, op, arg);
    check_size(*t, 0, num_tokens, op, arg, "one row per token");
    check_size(*t, 1, top_k, op, arg, "top_k");
    check_has_data(*t, op, arg);
    if (!t->is_contiguous()) throw_invalid(op, std::string(arg) + " must be contiguous");
    check_same_device(router_logits, *t, op, "router_logits", arg);
  }
  check_blocks(sorted_pairs, block_expert, num_blocks, block_m, router_logits, op);
  const int64_t max_blocks =
      moe_route_max_blocks(num_pairs, static_cast<int32_t>(num_experts), block_m);
  if (block_expert.shape[0] < max_blocks) {
    throw_invalid(op, "block_expert must hold moe_route_max_blocks = " +
                          std::to_string(max_blocks) + " blocks, got " + block_expert.describe());
  }
  check_ids(expert_counts, num_experts, router_logits, op, "expert_counts");
  if (on_cuda(router_logits)) {
#ifdef MOELORA_WITH_CUDA
    if (!is_absent(workspace)) {
      check_same_device(router_logits, workspace, op, "router_logits", "workspace");
      if (!workspace.is_contiguous()) throw_invalid(op, "workspace must be contiguous");
      const int64_t bytes = workspace.numel() * static_cast<int64_t>(dtype_size(workspace.dtype));
      const int64_t needed =
          moe_route_workspace_bytes(num_tokens, static_cast<int32_t>(num_experts),
                                    DeviceKind::kCUDA);
      if (bytes < needed) {
        throw_invalid(op, "workspace must hold moe_route_workspace_bytes = " +
                              std::to_string(needed) + " bytes, got " + workspace.describe());
      }
    }
    return cuda::moe_route(router_logits, top_k, routing, renormalize, block_m, topk_ids,
                           topk_weights, sorted_pairs, block_expert, num_blocks, expert_counts,
                           stream, workspace);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::moe_route(router_logits, top_k, routing, renormalize, block_m, topk_ids, topk_weights,
                 sorted_pairs, block_expert, num_blocks, expert_counts);
}

void moe_expert_gemm(const TensorRef& input, int32_t input_pairs_per_row,
                     const MoeExpertWeights& weights, const TensorRef& sorted_pairs,
                     const TensorRef& block_expert, const TensorRef& num_blocks, int32_t block_m,
                     const MoeEpilogue& epilogue, const TensorRef& output, void* stream,
                     const MoeGemmOptions& options) {
  constexpr const char* op = "moe_expert_gemm";
  const MoeGemmKernel kernel = options.kernel;
  check_matrix(input, op, "input");
  check_matrix(output, op, "output");
  if (output.dtype != input.dtype) {
    throw_invalid(op, std::string("output must have the input's dtype ") +
                          dtype_name(input.dtype) + ", got " + output.describe());
  }
  check_same_device(input, output, op, "input", "output");
  if (input_pairs_per_row <= 0) {
    throw_invalid(op, "input_pairs_per_row must be positive, got " +
                          std::to_string(input_pairs_per_row));
  }
  check_size(output, 0, input.shape[0] * input_pairs_per_row, op, "output",
             "input rows * input_pairs_per_row");
  if (output.shape[0] > std::numeric_limits<int32_t>::max()) {
    throw_invalid(op, "at most 2^31 - 1 pairs, got " + std::to_string(output.shape[0]));
  }
  const int64_t n_dim = check_expert_weights(weights, input, op);
  if (gated(epilogue.activation, op)) {
    if (n_dim % 2 != 0) {
      throw_invalid(op, "a gated activation needs an even number of weight rows ([gate | up]), "
                        "got " + std::to_string(n_dim));
    }
    check_size(output, 1, n_dim / 2, op, "output", "half the weight rows (gated activation)");
  } else {
    check_size(output, 1, n_dim, op, "output", "the weight rows");
  }
  if (!is_absent(epilogue.topk_weights)) {
    const TensorRef& w = epilogue.topk_weights;
    check_dtype(w, DType::kFloat32, op, "topk_weights");
    check_ndim(w, 1, op, "topk_weights");
    check_size(w, 0, output.shape[0], op, "topk_weights", "one weight per pair");
    check_has_data(w, op, "topk_weights");
    check_same_device(input, w, op, "input", "topk_weights");
  }
  check_blocks(sorted_pairs, block_expert, num_blocks, block_m, input, op);
  if (kernel != MoeGemmKernel::kAuto && kernel != MoeGemmKernel::kSimple &&
      kernel != MoeGemmKernel::kTensorCore && kernel != MoeGemmKernel::kStream) {
    throw_invalid(op, "unknown kernel code " + std::to_string(static_cast<int>(kernel)));
  }
  if (options.stream_consumers < 0 || options.stream_consumers > kMoeMaxStreamConsumers) {
    throw_invalid(op, "stream_consumers must be in [0, " +
                          std::to_string(kMoeMaxStreamConsumers) + "], got " +
                          std::to_string(options.stream_consumers));
  }
  check_splits(options, output.shape[0] * n_dim, block_m, input, op);
  if (on_cuda(input)) {
#ifdef MOELORA_WITH_CUDA
    return cuda::moe_expert_gemm(input, input_pairs_per_row, weights, sorted_pairs, block_expert,
                                 num_blocks, block_m, epilogue, output, stream, options);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::moe_expert_gemm(input, input_pairs_per_row, weights, sorted_pairs, block_expert,
                       num_blocks, block_m, epilogue, output);
}

void moe_dequantize(const MoeExpertWeights& weights, int64_t first_expert, const TensorRef& out,
                    void* stream) {
  constexpr const char* op = "moe_dequantize";
  check_float_dtype(out, op, "out");
  check_ndim(out, 3, op, "out");
  check_has_data(out, op, "out");
  if (!out.is_contiguous()) throw_invalid(op, "out must be contiguous, got " + out.describe());
  // the weights are checked against rows of out's width, dtype and device
  TensorRef rows = make_tensor_ref(out.data, out.dtype, {1, out.shape[2]}, out.device,
                                   out.device_index);
  const int64_t n_dim = check_expert_weights(weights, rows, op);
  check_size(out, 1, n_dim, op, "out", "the weight rows");
  const int64_t experts = weights.weight.shape[0];
  if (first_expert < 0 || first_expert + out.shape[0] > experts) {
    throw_invalid(op, "experts [" + std::to_string(first_expert) + ", " +
                          std::to_string(first_expert + out.shape[0]) + ") are outside the " +
                          std::to_string(experts) + " of the stack");
  }
  if (out.numel() == 0) return;
  if (on_cuda(out)) {
#ifdef MOELORA_WITH_CUDA
    return cuda::moe_dequantize(weights, first_expert, out, stream);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::moe_dequantize(weights, first_expert, out);
}

namespace {

// An optional addend of `like`'s shape, dtype and device.
void check_addend(const TensorRef& addend, const TensorRef& like, const char* op,
                  const char* like_name) {
  if (is_absent(addend)) return;
  check_matrix(addend, op, "addend");
  if (addend.dtype != like.dtype) {
    throw_invalid(op, std::string("addend must have ") + like_name + "'s dtype " +
                          dtype_name(like.dtype) + ", got " + addend.describe());
  }
  check_same_device(like, addend, op, like_name, "addend");
  check_size(addend, 0, like.shape[0], op, "addend", "one row per row of the input");
  check_size(addend, 1, like.shape[1], op, "addend", "the input's width");
}

}  // namespace

void moe_activation(const TensorRef& h13, MoeActivation activation, float swiglu_alpha,
                    float swiglu_limit, const TensorRef& h, void* stream,
                    const TensorRef& addend) {
  constexpr const char* op = "moe_activation";
  check_matrix(h13, op, "h13");
  check_matrix(h, op, "h");
  if (h.dtype != h13.dtype) {
    throw_invalid(op, std::string("h must have h13's dtype ") + dtype_name(h13.dtype) +
                          ", got " + h.describe());
  }
  check_same_device(h13, h, op, "h13", "h");
  if (!gated(activation, op)) throw_invalid(op, "activation must be silu or gpt_oss");
  check_size(h, 0, h13.shape[0], op, "h", "one row per row of h13");
  check_size(h13, 1, 2 * h.shape[1], op, "h13", "twice h's width ([gate | up])");
  check_addend(addend, h13, op, "h13");
  if (on_cuda(h13)) {
#ifdef MOELORA_WITH_CUDA
    return cuda::moe_activation(h13, activation, swiglu_alpha, swiglu_limit, h, stream, addend);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::moe_activation(h13, activation, swiglu_alpha, swiglu_limit, h, addend);
}

void moe_sum(const TensorRef& y, int32_t top_k, const TensorRef& out, void* stream,
             const TensorRef& addend) {
  constexpr const char* op = "moe_sum";
  check_matrix(y, op, "y");
  check_matrix(out, op, "out");
  if (out.dtype != y.dtype) {
    throw_invalid(op, std::string("out must have y's dtype ") + dtype_name(y.dtype) + ", got " +
                          out.describe());
  }
  check_same_device(y, out, op, "y", "out");
  if (top_k <= 0) throw_invalid(op, "top_k must be positive, got " + std::to_string(top_k));
  check_size(y, 0, out.shape[0] * top_k, op, "y", "one row per (token, k) pair");
  check_size(y, 1, out.shape[1], op, "y", "out's width");
  check_addend(addend, y, op, "y");
  if (on_cuda(y)) {
#ifdef MOELORA_WITH_CUDA
    return cuda::moe_sum(y, top_k, out, stream, addend);
#else
    no_cuda_kernel(op);
#endif
  }
  cpu::moe_sum(y, top_k, out, addend);
}

}  // namespace moelora
