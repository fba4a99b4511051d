// CPU reference of moe_route (moelora/moe.h): per token, the top-k experts by logit (ties to
// the lower expert id, NaN below every number), their weights, then a counting sort of the pairs
// by expert into blocks of block_m rows, each expert's pairs in increasing pair-id order.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "half.h"
#include "kernels/moe_kernels.h"

namespace moelora::cpu {

namespace {

// The value a logit is ranked by: NaN ranks below every number.
float rank_key(float logit) {
  return std::isnan(logit) ? -std::numeric_limits<float>::infinity() : logit;
}

template <typename T>
void load_logits(const TensorRef& logits, int64_t token, std::vector<float>& row) {
  const T* src = static_cast<const T*>(logits.data) + token * logits.stride[0];
  for (size_t e = 0; e < row.size(); ++e) row[e] = to_float(src[e]);
}

// Experts of one token, best first, and their weights.
void route_token(const std::vector<float>& logits, int32_t top_k, MoeRouting routing,
                 bool renormalize, int32_t* ids, float* weights) {
  const int32_t num_experts = static_cast<int32_t>(logits.size());
  std::vector<int32_t> order(static_cast<size_t>(num_experts));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int32_t a, int32_t b) {
    const float ka = rank_key(logits[a]), kb = rank_key(logits[b]);
    return ka > kb || (ka == kb && a < b);
  });
  const float top = rank_key(logits[order[0]]);  // the largest key: the softmax's shift
  if (routing == MoeRouting::kTopkSoftmax) {
    float sum = 0.0f;
    for (int32_t k = 0; k < top_k; ++k) {
      weights[k] = std::exp(logits[order[k]] - top);
      sum += weights[k];
    }
    for (int32_t k = 0; k < top_k; ++k) weights[k] /= sum;
  } else {
    float sum = 0.0f;
    for (int32_t e = 0; e < num_experts; ++e) sum += std::exp(logits[e] - top);
    float selected = 0.0f;
    for (int32_t k = 0; k < top_k; ++k) {
      weights[k] = std::exp(logits[order[k]] - top) / sum;
      selected += weights[k];
    }
    if (renormalize) {
      for (int32_t k = 0; k < top_k; ++k) weights[k] /= selected;
    }
  }
  for (int32_t k = 0; k < top_k; ++k) ids[k] = order[k];
}

}  // namespace

void moe_route(const TensorRef& router_logits, int32_t top_k, MoeRouting routing,
               bool renormalize, int32_t block_m, const TensorRef& topk_ids,
               const TensorRef& topk_weights, const TensorRef& sorted_pairs,
               const TensorRef& block_expert, const TensorRef& num_blocks,
               const TensorRef& expert_counts) {
  const int64_t num_tokens = router_logits.shape[0];
  const int32_t num_experts = static_cast<int32_t>(router_logits.shape[1]);
  auto* ids = static_cast<int32_t*>(topk_ids.data);
  auto* weights = static_cast<float*>(topk_weights.data);
  std::vector<float> row(static_cast<size_t>(num_experts));
  std::vector<int32_t> token_ids(static_cast<size_t>(top_k));
  std::vector<float> token_weights(static_cast<size_t>(top_k));
  std::vector<int32_t> counts(static_cast<size_t>(num_experts), 0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    switch (router_logits.dtype) {
      case DType::kFloat32: load_logits<float>(router_logits, t, row); break;
      case DType::kFloat16: load_logits<Half>(router_logits, t, row); break;
      default: load_logits<BFloat16>(router_logits, t, row); break;
    }
    route_token(row, top_k, routing, renormalize, token_ids.data(), token_weights.data());
    for (int32_t k = 0; k < top_k; ++k) {
      ids[t * topk_ids.stride[0] + k * topk_ids.stride[1]] = token_ids[k];
      weights[t * topk_weights.stride[0] + k * topk_weights.stride[1]] = token_weights[k];
      ++counts[static_cast<size_t>(token_ids[k])];
    }
  }

  // Each expert's rows start at a multiple of block_m, in expert order.
  std::vector<int64_t> first_row(static_cast<size_t>(num_experts));
  int64_t blocks = 0;
  auto* b_expert = static_cast<int32_t*>(block_expert.data);
  for (int32_t e = 0; e < num_experts; ++e) {
    first_row[static_cast<size_t>(e)] = blocks * block_m;
    const int64_t expert_blocks = (counts[static_cast<size_t>(e)] + block_m - 1) / block_m;
    for (int64_t b = blocks; b < blocks + expert_blocks; ++b) {
      b_expert[b * block_expert.stride[0]] = e;
    }
    blocks += expert_blocks;
  }
  for (int64_t b = blocks; b < block_expert.shape[0]; ++b) {
    b_expert[b * block_expert.stride[0]] = -1;
  }
  auto* pairs = static_cast<int32_t*>(sorted_pairs.data);
  for (int64_t r = 0; r < sorted_pairs.shape[0]; ++r) pairs[r * sorted_pairs.stride[0]] = -1;
  std::vector<int64_t> next_row = first_row;
  for (int64_t p = 0; p < num_tokens * top_k; ++p) {
    const int32_t expert = ids[(p / top_k) * topk_ids.stride[0] + (p % top_k) * topk_ids.stride[1]];
    pairs[next_row[static_cast<size_t>(expert)]++ * sorted_pairs.stride[0]] =
        static_cast<int32_t>(p);
  }
  *static_cast<int32_t*>(num_blocks.data) = static_cast<int32_t>(blocks);
  for (int32_t e = 0; e < num_experts; ++e) {
    static_cast<int32_t*>(expert_counts.data)[e * expert_counts.stride[0]] =
        counts[static_cast<size_t>(e)];
  }
}

}  // namespace moelora::cpu
