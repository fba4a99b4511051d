// CPU reference of fused_moe_lora (and of dense_lora, which is the one-expert, unweighted case
// with an absent block_expert, and of fused_moe_lora_unsorted, over a host-side alignment).
//   For each block (slot a, expert e), slice i of rank r = rank_i(a), and pair p in the block:
//     shrink[k] = w[p] * sum_d input[p / input_pairs_per_row, d] * A_i[a, e][k, d]  (k < r)
//     output[p, col_i + j] = round(output[p, col_i + j] + sum_k shrink[k] * B_i^T[a, e][k, j])
//   The rank-sized intermediate stays in float32 and each output element is rounded once.
// Work is split over blocks; moe_lora_align puts every pair in exactly one block, so threads
// never write the same output row. All indices are checked before the split.
#include <algorithm>
#include <string>
#include <vector>

#include "half.h"
#include "kernels/cpu_parallel.h"
#include "kernels/dispatch.h"
#include "kernels/validate.h"

namespace moelora::cpu {

namespace {

struct BlockProblem {
  const std::byte* input;  // [rows][in_dim], row stride input_row_stride elements
  int64_t input_row_stride;
  int32_t input_pairs_per_row;
  std::byte* output;  // [pairs][width], row stride output_row_stride elements
  int64_t output_row_stride;
  const float* topk_weights;  // [pairs] (strided) or null
  int64_t weight_stride;
  const int32_t* sorted_pairs;  // [num_blocks * block_m], pad = -1
  int64_t pairs_stride;
  std::vector<int32_t> slot_of_block;
  std::vector<int32_t> expert_of_block;
  int32_t block_m;
  const std::vector<LoraSiteView>* slices;
  const std::vector<int64_t>* col_offsets;
  int64_t max_width;  // largest in_dim / out_dim, sizes the scratch rows
};

template <typename T>
void run_blocks(const BlockProblem& problem, int64_t block_begin, int64_t block_end) {
  const auto& slices = *problem.slices;
  int32_t max_rank = 0;
  for (const auto& view : slices) max_rank = std::max(max_rank, view.max_rank);
  std::vector<float> input_row(static_cast<size_t>(problem.max_width));
  std::vector<float> weight_row(static_cast<size_t>(problem.max_width));
  std::vector<float> expand_row(static_cast<size_t>(problem.max_width));
  std::vector<float> shrink(static_cast<size_t>(max_rank));

  for (int64_t block = block_begin; block < block_end; ++block) {
    const int32_t slot = problem.slot_of_block[static_cast<size_t>(block)];
    const int32_t expert = problem.expert_of_block[static_cast<size_t>(block)];
    for (int64_t row = block * problem.block_m; row < (block + 1) * problem.block_m; ++row) {
      const int32_t pair = problem.sorted_pairs[row * problem.pairs_stride];
      if (pair < 0) continue;
      const float weight =
          problem.topk_weights ? problem.topk_weights[pair * problem.weight_stride] : 1.0f;
      const T* x = reinterpret_cast<const T*>(problem.input) +
                   (pair / problem.input_pairs_per_row) * problem.input_row_stride;
      T* y = reinterpret_cast<T*>(problem.output) + pair * problem.output_row_stride;
      bool input_loaded = false;
      for (size_t i = 0; i < slices.size(); ++i) {
        const LoraSiteView& view = slices[i];
        const int32_t rank = view.rank(slot);
        if (rank == 0) continue;
        if (!input_loaded) {
          load_row_as_float(x, view.in_dim, input_row.data());
          input_loaded = true;
        }
        for (int32_t k = 0; k < rank; ++k) {
          const T* a_row = reinterpret_cast<const T*>(view.row(slot, expert, false, k));
          load_row_as_float(a_row, view.in_dim, weight_row.data());
          float dot = 0.0f;
          for (int64_t d = 0; d < view.in_dim; ++d) dot += input_row[d] * weight_row[d];
          shrink[k] = weight * dot;
        }
        std::fill(expand_row.begin(), expand_row.begin() + view.out_dim, 0.0f);
        for (int32_t k = 0; k < rank; ++k) {
          const T* b_row = reinterpret_cast<const T*>(view.row(slot, expert, true, k));
          const float s = shrink[k];
          for (int64_t j = 0; j < view.out_dim; ++j) expand_row[j] += s * to_float(b_row[j]);
        }
        T* y_slice = y + (*problem.col_offsets)[i];
        for (int64_t j = 0; j < view.out_dim; ++j) {
          y_slice[j] = from_float<T>(to_float(y_slice[j]) + expand_row[j]);
        }
      }
    }
  }
}

}  // namespace

void fused_moe_lora(const FusedMoeLoraArgs& a, const char* op) {
  const TensorRef &input = a.input, &output = a.output, &topk_weights = a.topk_weights,
                  &sorted_pairs = a.sorted_pairs, &block_slot = a.block_slot,
                  &block_expert = a.block_expert, &num_blocks = a.num_blocks;
  const int32_t input_pairs_per_row = a.input_pairs_per_row, block_m = a.block_m;
  const std::vector<LoraSiteView>& slices = a.slices;
  const std::vector<int64_t>& col_offsets = a.col_offsets;
  auto fail = [op](const std::string& problem) { kernels::throw_invalid(op, problem); };
  const char* pairs_arg = kernels::is_absent(block_expert) ? "sorted_rows" : "sorted_pairs";
  BlockProblem problem{};
  problem.input = static_cast<const std::byte*>(input.data);
  problem.input_row_stride = input.stride[0];
  problem.input_pairs_per_row = input_pairs_per_row;
  problem.output = static_cast<std::byte*>(output.data);
  problem.output_row_stride = output.stride[0];
  problem.topk_weights =
      kernels::is_absent(topk_weights) ? nullptr : static_cast<const float*>(topk_weights.data);
  problem.weight_stride = kernels::is_absent(topk_weights) ? 0 : topk_weights.stride[0];
  problem.sorted_pairs = static_cast<const int32_t*>(sorted_pairs.data);
  problem.pairs_stride = sorted_pairs.stride[0];
  problem.block_m = block_m;
  problem.slices = &slices;
  problem.col_offsets = &col_offsets;
  problem.max_width = input.shape[1];
  for (const auto& view : slices) problem.max_width = std::max(problem.max_width, view.out_dim);

  // Read and check the block metadata before any thread starts: a bad id must be an error,
  // never an out-of-bounds access.
  const int32_t blocks = *static_cast<const int32_t*>(num_blocks.data);
  if (blocks < 0 || blocks > block_slot.shape[0]) {
    fail("num_blocks = " + std::to_string(blocks) + " is outside [0, len(block_slot) = " +
         std::to_string(block_slot.shape[0]) + "]");
  }
  const int64_t num_pairs = output.shape[0];
  const int64_t input_rows = input.shape[0];
  int64_t work = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int32_t slot = static_cast<const int32_t*>(block_slot.data)[b * block_slot.stride[0]];
    const int32_t expert =
        kernels::is_absent(block_expert)
            ? 0
            : static_cast<const int32_t*>(block_expert.data)[b * block_expert.stride[0]];
    for (size_t i = 0; i < slices.size(); ++i) {
      const LoraSiteView& view = slices[i];
      const std::string name = "slices[" + std::to_string(i) + "]";
      if (slot < 0 || slot >= view.num_slots) {
        fail("block_slot[" + std::to_string(b) + "] = " + std::to_string(slot) +
             " is outside [0, " + name + ".num_slots = " + std::to_string(view.num_slots) + ")");
      }
      if (expert < 0 || expert >= view.num_experts) {
        fail("block_expert[" + std::to_string(b) + "] = " + std::to_string(expert) +
             " is outside [0, " + name + ".num_experts = " + std::to_string(view.num_experts) +
             ")");
      }
      const int32_t rank = view.rank(slot);
      if (rank < 0 || rank > view.max_rank) {
        fail(name + " rank of slot " + std::to_string(slot) + " is " + std::to_string(rank) +
             ", outside [0, max_rank = " + std::to_string(view.max_rank) + "]");
      }
      work += int64_t{block_m} * rank * (view.in_dim + view.out_dim);
    }
    for (int64_t row = b * block_m; row < (b + 1) * block_m; ++row) {
      const int32_t pair = problem.sorted_pairs[row * problem.pairs_stride];
      const bool outside = pair < -1 || pair >= num_pairs;
      if (outside || (pair >= 0 && pair / input_pairs_per_row >= input_rows)) {
        fail(std::string(pairs_arg) + "[" + std::to_string(row) + "] = " + std::to_string(pair) +
             " is outside the " + std::to_string(num_pairs) + " output rows / " +
             std::to_string(input_rows) + " input rows");
      }
    }
    problem.slot_of_block.push_back(slot);
    problem.expert_of_block.push_back(expert);
  }

  auto body = [&](int64_t begin, int64_t end) {
    switch (input.dtype) {
      case DType::kFloat32: run_blocks<float>(problem, begin, end); break;
      case DType::kFloat16: run_blocks<Half>(problem, begin, end); break;
      default: run_blocks<BFloat16>(problem, begin, end); break;
    }
  };
  parallel_for(blocks, work, body);
}

}  // namespace moelora::cpu
