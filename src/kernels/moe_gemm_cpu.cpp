// CPU reference of moe_expert_gemm (moelora/moe.h). Per block (expert e) and output column
// tile: the block's input rows are converted to float once, each weight row is dequantized to
// float (rounded to the activations' dtype, as the kernels see it), dot products accumulate in
// float32, and the epilogue (bias, activation, routing weight) rounds once per element.
// Work items are (block, column tile): they write disjoint output elements.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "half.h"
#include "half_convert.h"
#include "kernels/cpu_parallel.h"
#include "kernels/moe_kernels.h"
#include "kernels/validate.h"
#include "mxfp4_layout.h"

namespace moelora::cpu {

namespace {

constexpr int64_t kColumnTile = 64;

// E2M1 magnitudes of codes 0..7 (bit 3 is the sign).
constexpr float kE2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

float e4m3_to_float(uint8_t bits) {
  const int sign = bits >> 7, exponent = (bits >> 3) & 0xF, mantissa = bits & 0x7;
  float value;
  if (exponent == 0xF && mantissa == 0x7) {
    value = NAN;
  } else if (exponent == 0) {
    value = std::ldexp(static_cast<float>(mantissa) / 8.0f, -6);
  } else {
    value = std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
  }
  return sign ? -value : value;
}

template <typename T>
float round_to(float value) {
  return to_float(from_float<T>(value));
}

// Row n of expert e, dequantized into `out` [K] as the activations' dtype T holds it.
template <typename T>
void dequantize_row(const MoeExpertWeights& w, int64_t e, int64_t n, int64_t k_dim, float* out) {
  const TensorRef& wt = w.weight;
  switch (w.format) {
    case MoeWeightFormat::kDense: {
      const T* row = static_cast<const T*>(wt.data) + e * wt.stride[0] + n * wt.stride[1];
      load_row_as_float(row, k_dim, out);
      return;
    }
    case MoeWeightFormat::kMxfp4: {
      const auto* expert_blocks = static_cast<const uint8_t*>(wt.data) + e * wt.stride[0];
      const auto* expert_scales =
          static_cast<const uint8_t*>(w.scales.data) + e * w.scales.stride[0];
      const bool tiled = w.mxfp4_layout == MoeMxfp4Layout::kMmaTiled;
      const bool mma = tiled || w.mxfp4_layout == MoeMxfp4Layout::kMma;
      for (int64_t g = 0; g < k_dim / 32; ++g) {
        const uint8_t* bytes =
            expert_blocks + (tiled ? mxfp4::tiled_block_offset(wt.stride[1], n, g)
                                   : n * wt.stride[1] + g * wt.stride[2]);
        const uint8_t scale =
            expert_scales[tiled ? mxfp4::tiled_scale_offset(w.scales.stride[1], n, g)
                                : n * w.scales.stride[1] + g * w.scales.stride[2]];
        const int exponent = static_cast<int>(scale) - 127;
        for (int u = 0; u < 4; ++u) {  // little-endian words of 8 codes
          const uint8_t* b = bytes + 4 * u;
          uint32_t word = b[0] | uint32_t{b[1]} << 8 | uint32_t{b[2]} << 16 | uint32_t{b[3]} << 24;
          if (mma) word = mxfp4::from_mma(word);
          for (int i = 0; i < 8; ++i) {
            const uint32_t code = mxfp4::code_of_checkpoint(word, i);
            const float magnitude = std::ldexp(kE2m1[code & 7], exponent);
            out[g * 32 + 8 * u + i] = round_to<T>(code & 8 ? -magnitude : magnitude);
          }
        }
      }
      return;
    }
    case MoeWeightFormat::kFp8Block: {
      const auto* row = static_cast<const uint8_t*>(wt.data) + e * wt.stride[0] +
                        n * wt.stride[1];
      const auto* scales = static_cast<const float*>(w.scales.data) + e * w.scales.stride[0] +
                           (n / w.block_n) * w.scales.stride[1];
      for (int64_t k = 0; k < k_dim; ++k) {
        const float scale = scales[(k / w.block_k) * w.scales.stride[2]];
        out[k] = round_to<T>(e4m3_to_float(row[k]) * scale);
      }
      return;
    }
  }
}

struct GemmProblem {
  const TensorRef* input;
  int32_t input_pairs_per_row;
  const MoeExpertWeights* weights;
  const MoeEpilogue* epilogue;
  const TensorRef* output;
  const int32_t* sorted_pairs;
  int64_t pairs_stride;
  std::vector<int32_t> expert_of_block;
  int32_t block_m;
  int64_t n_dim, k_dim, out_cols;
  bool gated;
};

float bias_of(const MoeExpertWeights& w, int64_t e, int64_t n) {
  if (kernels::is_absent(w.bias)) return 0.0f;
  const int64_t index = e * w.bias.stride[0] + n * w.bias.stride[1];
  return detail::load_as_float(w.bias.data, w.bias.dtype, index);
}

float activate(const MoeEpilogue& ep, float gate, float up) {
  return ep.activation == MoeActivation::kSilu
             ? moe_math::silu_glu(gate, up)
             : moe_math::gpt_oss_glu(gate, up, ep.swiglu_alpha, ep.swiglu_limit);
}

// Output columns [col_begin, col_end) of every pair of block b.
template <typename T>
void run_item(const GemmProblem& pr, int64_t b, int64_t col_begin, int64_t col_end) {
  const int64_t e = pr.expert_of_block[static_cast<size_t>(b)];
  const int64_t k_dim = pr.k_dim;
  std::vector<int32_t> pairs;
  std::vector<float> rows;  // [pairs][K]
  for (int64_t r = b * pr.block_m; r < (b + 1) * pr.block_m; ++r) {
    const int32_t pair = pr.sorted_pairs[r * pr.pairs_stride];
    if (pair < 0) continue;
    pairs.push_back(pair);
    rows.resize(pairs.size() * k_dim);
    const T* x = static_cast<const T*>(pr.input->data) +
                 (pair / pr.input_pairs_per_row) * pr.input->stride[0];
    load_row_as_float(x, k_dim, rows.data() + (pairs.size() - 1) * k_dim);
  }
  if (pairs.empty()) return;
  const size_t count = pairs.size();
  std::vector<float> weight_row(static_cast<size_t>(k_dim));
  std::vector<float> acc(count), up_acc(count);
  const float* topk = kernels::is_absent(pr.epilogue->topk_weights)
                          ? nullptr
                          : static_cast<const float*>(pr.epilogue->topk_weights.data);
  const int64_t topk_stride = topk ? pr.epilogue->topk_weights.stride[0] : 0;
  auto dot_all = [&](int64_t n, std::vector<float>& into) {
    dequantize_row<T>(*pr.weights, e, n, k_dim, weight_row.data());
    const float bias = bias_of(*pr.weights, e, n);
    for (size_t i = 0; i < count; ++i) {
      const float* x = rows.data() + i * k_dim;
      float sum = 0.0f;
      for (int64_t k = 0; k < k_dim; ++k) sum += x[k] * weight_row[static_cast<size_t>(k)];
      into[i] = sum + bias;
    }
  };
  for (int64_t col = col_begin; col < col_end; ++col) {
    dot_all(col, acc);
    if (pr.gated) dot_all(pr.out_cols + col, up_acc);
    for (size_t i = 0; i < count; ++i) {
      float value = pr.gated ? activate(*pr.epilogue, acc[i], up_acc[i]) : acc[i];
      if (topk) value *= topk[pairs[i] * topk_stride];
      T* out = static_cast<T*>(pr.output->data) + pairs[i] * pr.output->stride[0];
      out[col] = from_float<T>(value);
    }
  }
}

}  // namespace

void moe_expert_gemm(const TensorRef& input, int32_t input_pairs_per_row,
                     const MoeExpertWeights& weights, const TensorRef& sorted_pairs,
                     const TensorRef& block_expert, const TensorRef& num_blocks, int32_t block_m,
                     const MoeEpilogue& epilogue, const TensorRef& output) {
  constexpr const char* op = "moe_expert_gemm";
  GemmProblem pr{};
  pr.input = &input;
  pr.input_pairs_per_row = input_pairs_per_row;
  pr.weights = &weights;
  pr.epilogue = &epilogue;
  pr.output = &output;
  pr.sorted_pairs = static_cast<const int32_t*>(sorted_pairs.data);
  pr.pairs_stride = sorted_pairs.stride[0];
  pr.block_m = block_m;
  pr.n_dim = weights.rows();
  pr.k_dim = input.shape[1];
  pr.gated = epilogue.activation != MoeActivation::kNone;
  pr.out_cols = output.shape[1];

  // Every id is checked before any thread starts: a bad one is an error, never a stray access.
  const int32_t blocks = *static_cast<const int32_t*>(num_blocks.data);
  if (blocks < 0 || blocks > block_expert.shape[0]) {
    kernels::throw_invalid(op, "num_blocks = " + std::to_string(blocks) +
                                   " is outside [0, len(block_expert) = " +
                                   std::to_string(block_expert.shape[0]) + "]");
  }
  const int64_t num_experts = weights.weight.shape[0];
  const int64_t num_pairs = output.shape[0];
  for (int64_t b = 0; b < blocks; ++b) {
    const int32_t e = static_cast<const int32_t*>(block_expert.data)[b * block_expert.stride[0]];
    if (e < 0 || e >= num_experts) {
      kernels::throw_invalid(op, "block_expert[" + std::to_string(b) + "] = " +
                                     std::to_string(e) + " is outside [0, " +
                                     std::to_string(num_experts) + ")");
    }
    pr.expert_of_block.push_back(e);
    for (int64_t r = b * block_m; r < (b + 1) * block_m; ++r) {
      const int32_t pair = pr.sorted_pairs[r * pr.pairs_stride];
      if (pair < -1 || pair >= num_pairs || pair / input_pairs_per_row >= input.shape[0]) {
        kernels::throw_invalid(op, "sorted_pairs[" + std::to_string(r) + "] = " +
                                       std::to_string(pair) + " is outside the " +
                                       std::to_string(num_pairs) + " output rows");
      }
    }
  }
  const int64_t tiles = (pr.out_cols + kColumnTile - 1) / kColumnTile;
  const int64_t work = int64_t{blocks} * block_m * pr.n_dim * pr.k_dim;
  parallel_for(int64_t{blocks} * tiles, work, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, tile = item % tiles;
      const int64_t col_begin = tile * kColumnTile;
      const int64_t col_end = std::min(pr.out_cols, col_begin + kColumnTile);
      switch (input.dtype) {
        case DType::kFloat32: run_item<float>(pr, b, col_begin, col_end); break;
        case DType::kFloat16: run_item<Half>(pr, b, col_begin, col_end); break;
        default: run_item<BFloat16>(pr, b, col_begin, col_end); break;
      }
    }
  });
}

void moe_dequantize(const MoeExpertWeights& weights, int64_t first_expert, const TensorRef& out) {
  const int64_t n_dim = out.shape[1], k_dim = out.shape[2];
  parallel_for(out.shape[0] * n_dim, out.numel(), [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(k_dim));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = first_expert + item / n_dim, n = item % n_dim;
      void* dst = static_cast<uint8_t*>(out.data) +
                  item * k_dim * static_cast<int64_t>(dtype_size(out.dtype));
      switch (out.dtype) {
        case DType::kFloat32:
          dequantize_row<float>(weights, e, n, k_dim, static_cast<float*>(dst));
          break;
        case DType::kFloat16:
          dequantize_row<Half>(weights, e, n, k_dim, row.data());
          for (int64_t k = 0; k < k_dim; ++k) static_cast<Half*>(dst)[k] = from_float<Half>(row[k]);
          break;
        default:
          dequantize_row<BFloat16>(weights, e, n, k_dim, row.data());
          for (int64_t k = 0; k < k_dim; ++k) {
            static_cast<BFloat16*>(dst)[k] = from_float<BFloat16>(row[k]);
          }
          break;
      }
    }
  });
}

}  // namespace moelora::cpu
