// moe_expert_gemm on the GPU: builds the kernels' arguments from the validated views and runs
// the kernel asked for: the persistent stream kernel (moe/stream.cuh, decode), the tiled
// tensor-core kernel (moe/gemm.cuh) or the simple one (moe/simple.cu). Both tensor-core kernels
// need bfloat16 / float16 activations, dense weights of that dtype or MXFP4 / block FP8 with
// bfloat16, and 16-byte aligned rows; kAuto is the tiled kernel when it takes the call, else the
// simple one. The caller's plan (moelora.ops.moe.plan_expert_gemm) chooses kernel and block_m.
#include <algorithm>
#include <string>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "kernels/moe_kernels.h"
#include "kernels/validate.h"
#include "moe/gemm.cuh"
#include "moe/stream.cuh"

namespace moelora::cuda {

using kernels::is_absent;

namespace {

moe::GemmArgs gemm_args(const TensorRef& input, int32_t input_pairs_per_row,
                        const MoeExpertWeights& w, const TensorRef& sorted_pairs,
                        const TensorRef& block_expert, const TensorRef& num_blocks,
                        const MoeEpilogue& epilogue, const TensorRef& output) {
  moe::GemmArgs a{};
  a.input = input.data;
  a.input_stride = input.stride[0];
  a.pairs_per_row = input_pairs_per_row;
  a.output = output.data;
  a.output_stride = output.stride[0];
  const int64_t elem = w.format == MoeWeightFormat::kDense
                           ? static_cast<int64_t>(dtype_size(w.weight.dtype))
                           : 1;  // MXFP4 and FP8 strides count bytes
  const bool tiled = w.mxfp4_layout == MoeMxfp4Layout::kMmaTiled;
  a.weight = static_cast<const uint8_t*>(w.weight.data);
  a.w_expert = w.weight.stride[0] * elem;
  a.w_row = tiled ? w.weight.stride[3] : w.weight.stride[1] * elem;
  a.w_tile = tiled ? w.weight.stride[1] : 16 * a.w_row;
  a.k_dim = static_cast<int32_t>(input.shape[1]);
  a.n_dim = static_cast<int32_t>(w.rows());
  switch (w.format) {
    case MoeWeightFormat::kDense: a.row_bytes = static_cast<int32_t>(a.k_dim * elem); break;
    case MoeWeightFormat::kMxfp4: a.row_bytes = a.k_dim / 2; break;
    case MoeWeightFormat::kFp8Block: a.row_bytes = a.k_dim; break;
  }
  if (!is_absent(w.scales)) {
    a.scales = w.scales.data;
    a.s_expert = w.scales.stride[0];
    a.s_row = tiled ? w.scales.stride[3] : w.scales.stride[1];
    a.s_tile = tiled ? w.scales.stride[1] : 16 * a.s_row;
  }
  a.block_n = w.block_n;
  a.block_k = w.block_k;
  a.mxfp4_layout = w.mxfp4_layout;
  if (!is_absent(w.bias)) {
    a.bias = w.bias.data;
    a.b_expert = w.bias.stride[0];
    a.b_row = w.bias.stride[1];
    a.bias_dtype = w.bias.dtype;
  }
  a.gated = epilogue.activation != MoeActivation::kNone;
  a.inter = a.gated ? a.n_dim / 2 : 0;
  a.activation = epilogue.activation;
  a.alpha = epilogue.swiglu_alpha;
  a.limit = epilogue.swiglu_limit;
  if (!is_absent(epilogue.topk_weights)) {
    a.topk_weights = static_cast<const float*>(epilogue.topk_weights.data);
    a.topk_stride = epilogue.topk_weights.stride[0];
  }
  a.sorted_pairs = static_cast<const int32_t*>(sorted_pairs.data);
  a.block_expert = static_cast<const int32_t*>(block_expert.data);
  a.num_blocks = static_cast<const int32_t*>(num_blocks.data);
  a.num_pairs = output.shape[0];
  a.splits = 1;
  a.split_steps = (a.row_bytes + 63) / 64;
  return a;
}

bool aligned16(const void* p, int64_t bytes_stride) {
  return detail::aligned16(p) && bytes_stride % 16 == 0;
}

// Why the tensor-core kernel cannot take this call, or "" when it can.
std::string tensor_core_refusal(const TensorRef& input, const MoeExpertWeights& w,
                                int32_t block_m, int64_t max_blocks) {
  const DType dtype = input.dtype;
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) {
    return "activations must be bfloat16 or float16";
  }
  if (w.format != MoeWeightFormat::kDense && dtype != DType::kBFloat16) {
    return "MXFP4 and FP8 weights take bfloat16 activations";
  }
  if (block_m != 8 && block_m != 16 && block_m != 32 && block_m != 64) {
    return "block_m must be 8, 16, 32 or 64";
  }
  if (max_blocks > 65535) return "at most 65535 blocks";
  const int64_t k = input.shape[1];
  if (k % 8 != 0 || !aligned16(input.data, input.stride[0] * 2)) {
    return "input rows must be 16-byte aligned with a width that is a multiple of 8";
  }
  const int64_t elem = w.format == MoeWeightFormat::kDense ? 2 : 1;
  if (!aligned16(w.weight.data, w.weight.stride[1] * elem) || (w.weight.stride[0] * elem) % 16) {
    return "weight rows must be 16-byte aligned";
  }
  if (w.format == MoeWeightFormat::kMxfp4 && w.mxfp4_layout != MoeMxfp4Layout::kMmaTiled &&
      (w.weight.stride[2] != 16 || w.scales.stride[2] != 1)) {
    return "MXFP4 blocks and scales must be contiguous along K";
  }
  if (w.format == MoeWeightFormat::kFp8Block && (k % 16 != 0 || w.block_k % 16 != 0)) {
    return "FP8 needs K and block_k to be multiples of 16";
  }
  return "";
}

}  // namespace

namespace {

// The stream kernel for this call: "" when launched, else why it cannot take it.
std::string launch_stream(const moe::GemmArgs& a, const TensorRef& input,
                          const MoeExpertWeights& w, int32_t block_m, int64_t max_blocks,
                          int32_t consumers, cudaStream_t s) {
  switch (w.format) {
    case MoeWeightFormat::kDense:
      return moe::launch_stream_dense(a, input.dtype, block_m, max_blocks, consumers, s);
    case MoeWeightFormat::kMxfp4:
      return moe::launch_stream_mxfp4(a, block_m, max_blocks, consumers, s);
    case MoeWeightFormat::kFp8Block:
      return moe::launch_stream_fp8(a, block_m, max_blocks, consumers, s);
  }
  return "unknown weight format";
}

void launch_tiles(const moe::GemmArgs& a, const TensorRef& input, const MoeExpertWeights& w,
                  int32_t block_m, int64_t max_blocks, cudaStream_t s) {
  switch (w.format) {
    case MoeWeightFormat::kDense:
      moe::launch_gemm_dense(a, input.dtype, block_m, max_blocks, s);
      break;
    case MoeWeightFormat::kMxfp4: moe::launch_gemm_mxfp4(a, block_m, max_blocks, s); break;
    case MoeWeightFormat::kFp8Block: moe::launch_gemm_fp8(a, block_m, max_blocks, s); break;
  }
}

int steps_per_stage(MoeWeightFormat format) {
  switch (format) {
    case MoeWeightFormat::kMxfp4: return moe::steps_per_stage<moe::Mxfp4Format>();
    case MoeWeightFormat::kFp8Block: return moe::steps_per_stage<moe::Fp8Format>();
    default: return moe::steps_per_stage<moe::DenseFormat<__nv_bfloat16>>();
  }
}

// The tiled kernel in `wanted` k splits (1: its own epilogue, as one CTA per tile and block
// computes it). The k-steps per split round up to whole x stages, so fewer splits may hold
// them all; the partials go to the caller's workspace (checked by moe_ops.cpp to hold
// wanted * pairs * N floats) or to stream-ordered scratch.
void launch_tensor_core(moe::GemmArgs a, const TensorRef& input, const MoeExpertWeights& w,
                        int32_t block_m, int64_t max_blocks, int32_t wanted,
                        const TensorRef& workspace, cudaStream_t s) {
  const int steps = (a.row_bytes + 63) / 64;
  const int per_stage = steps_per_stage(w.format);
  const int per_split = (steps + std::max(wanted, 1) - 1) / std::max(wanted, 1);
  a.split_steps = std::max(per_stage, (per_split + per_stage - 1) / per_stage * per_stage);
  a.splits = (steps + a.split_steps - 1) / a.split_steps;
  if (a.splits <= 1 || a.num_pairs == 0) {
    a.splits = 1;
    a.split_steps = std::max(steps, 1);
    return launch_tiles(a, input, w, block_m, max_blocks, s);
  }
  const bool own = is_absent(workspace);
  const size_t bytes = sizeof(float) * static_cast<size_t>(a.splits) *
                       static_cast<size_t>(a.num_pairs) * static_cast<size_t>(a.n_dim);
  a.partials = static_cast<float*>(own ? detail::scratch_alloc(bytes, s) : workspace.data);
  try {
    launch_tiles(a, input, w, block_m, max_blocks, s);
    moe::launch_split_finish(a, input.dtype, block_m, max_blocks, s);
  } catch (...) {
    if (own) cudaFreeAsync(a.partials, s);  // best effort: the launch error is the one to report
    throw;
  }
  if (own) detail::scratch_free(a.partials, s);
}

void refuse(const char* kernel, const std::string& why) {
  throw InvalidArgument(std::string("moe_expert_gemm: the ") + kernel +
                        " kernel cannot take this call: " + why);
}

}  // namespace

void moe_expert_gemm(const TensorRef& input, int32_t input_pairs_per_row,
                     const MoeExpertWeights& weights, const TensorRef& sorted_pairs,
                     const TensorRef& block_expert, const TensorRef& num_blocks, int32_t block_m,
                     const MoeEpilogue& epilogue, const TensorRef& output, void* stream,
                     const MoeGemmOptions& options) {
  const moe::GemmArgs a = gemm_args(input, input_pairs_per_row, weights, sorted_pairs,
                                    block_expert, num_blocks, epilogue, output);
  const int64_t max_blocks = block_expert.shape[0];
  const cudaStream_t s = detail::as_stream(stream);
  const std::string refusal = tensor_core_refusal(input, weights, block_m, max_blocks);
  MoeGemmKernel kernel = options.kernel;
  const bool fall_back = options.fall_back;
  if (kernel == MoeGemmKernel::kStream) {
    const std::string why =
        refusal.empty()
            ? launch_stream(a, input, weights, block_m, max_blocks, options.stream_consumers, s)
            : refusal;
    if (why.empty()) return detail::check_launch("moe_expert_gemm");
    if (!fall_back) refuse("stream", why);
    kernel = MoeGemmKernel::kAuto;
  }
  if (kernel == MoeGemmKernel::kTensorCore && !refusal.empty()) {
    if (!fall_back) refuse("tensor-core", refusal);
    kernel = MoeGemmKernel::kAuto;
  }
  if (kernel == MoeGemmKernel::kSimple || !refusal.empty()) {
    moe::launch_gemm_simple(a, weights.format, input.dtype, block_m, max_blocks, s);
  } else {
    launch_tensor_core(a, input, weights, block_m, max_blocks, options.splits, options.workspace,
                       s);
  }
  detail::check_launch("moe_expert_gemm");
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
