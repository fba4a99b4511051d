// fused_moe_lora and dense_lora on the GPU: builds the kernels' arguments from the validated
// views and picks a kernel family per call (lora/kernels.h): tensor-core tiles when the groups
// hold many rows (prefill), one cluster per group when they hold few (decode), the split-K CUDA-
// core kernels for everything else (float32, rows not 16-byte aligned).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "common/common.cuh"
#include "kernels/dispatch.h"
#include "kernels/validate.h"
#include "lora/kernels.h"
#include "moelora/ops.h"

namespace moelora::cuda {

using kernels::is_absent;

namespace {

LoraVectorization vectorization(const LoraArgs& a, const TensorRef& input,
                                const TensorRef& output) {
  const int64_t elem = static_cast<int64_t>(dtype_size(input.dtype));
  const int64_t vec = 16 / elem;
  LoraVectorization v{};
  v.input = detail::aligned16(input.data) && (input.stride[0] * elem) % 16 == 0 &&
            a.in_dim % vec == 0;
  v.output = detail::aligned16(output.data) && (output.stride[0] * elem) % 16 == 0;
  for (int i = 0; i < a.num_slices; ++i) {
    if (a.slices[i].out_dim % vec != 0 || a.slices[i].col_offset % vec != 0) v.output = false;
  }
  return v;
}

enum class LoraKernel { kMma, kCluster, kSplitK };

// From this many pairs the tensor-core kernel takes grouped calls (prefill); fewer are decode,
// where the engine mostly takes the unsorted form anyway. v2 also asked for >= 8 rows per block
// estimated as num_pairs / max_blocks, but max_blocks counts a padded block per (slot, expert)
// and sent gpt-oss and qwen3 at 512 tokens to the cluster kernel at half the speed (v3 notes);
// and it needed 2048 pairs because one CTA per block walked every output column (mixtral at 512
// tokens), which the column split (lora/prefill.cu) now spreads over CTAs.
constexpr int64_t kMmaMinPairs = 512;
// The tensor-core kernel passed the GPU suite on the H200 (bench/NOTES.md, v2).
constexpr bool kMmaEnabled = true;

// MOELORA_LORA_KERNEL=splitk|cluster|mma forces a family where it applies (benchmarks and
// tests compare them); unset or "auto" lets choose_lora_kernel decide.
// Read on every call (a getenv is ~100 ns) so a test can switch families in one process.
std::optional<LoraKernel> forced_lora_kernel() {
  return []() -> std::optional<LoraKernel> {
    const char* value = std::getenv("MOELORA_LORA_KERNEL");
    const std::string name = value != nullptr ? value : "auto";
    if (name == "splitk") return LoraKernel::kSplitK;
    if (name == "cluster") return LoraKernel::kCluster;
    if (name == "mma") return LoraKernel::kMma;
    if (name != "auto" && !name.empty()) {
      throw InvalidArgument("MOELORA_LORA_KERNEL must be auto, splitk, cluster or mma, got '" +
                            name + "'");
    }
    return std::nullopt;
  }();
}

// The step's size decides the regime (known on the host; the groups live on the device).
LoraKernel choose_lora_kernel(const LoraArgs& a, DType dtype, LoraVectorization vec) {
  if (const auto forced = forced_lora_kernel()) return *forced;
  if (kMmaEnabled && dtype != DType::kFloat32 && vec.input && vec.output &&
      a.num_pairs >= kMmaMinPairs) {
    return LoraKernel::kMma;
  }
  return LoraKernel::kCluster;
}

// The arguments every form shares; rank_stride 0 means no slot can add anything.
LoraArgs common_args(const TensorRef& input, int32_t input_pairs_per_row, const TensorRef& output,
                     const TensorRef& topk_weights, const std::vector<LoraSiteView>& slices,
                     const std::vector<int64_t>& col_offsets) {
  if (slices.size() > static_cast<size_t>(kMaxSlices)) {
    throw InvalidArgument("fused_moe_lora: the CUDA kernel takes at most " +
                          std::to_string(kMaxSlices) + " slices, got " +
                          std::to_string(slices.size()));
  }
  LoraArgs a{};
  a.input = input.data;
  a.input_stride = input.stride[0];
  a.input_rows = input.shape[0];
  a.in_dim = input.shape[1];
  a.input_pairs_per_row = input_pairs_per_row;
  a.output = output.data;
  a.output_stride = output.stride[0];
  a.num_pairs = output.shape[0];
  a.weights = is_absent(topk_weights) ? nullptr : static_cast<const float*>(topk_weights.data);
  a.weight_stride = is_absent(topk_weights) ? 0 : topk_weights.stride[0];
  a.num_slices = static_cast<int32_t>(slices.size());
  int32_t rank_stride = 0;
  for (size_t i = 0; i < slices.size(); ++i) {
    const LoraSiteView& v = slices[i];
    SliceArgs& s = a.slices[i];
    s.arena = v.arena;
    s.row_offsets = v.row_offsets;
    s.slot_stride = v.slot_stride;
    s.ranks = v.ranks;
    s.rank_slot_stride = v.rank_slot_stride;
    s.num_slots = v.num_slots;
    s.num_experts = v.num_experts;
    s.max_rank = v.max_rank;
    s.out_dim = v.out_dim;
    s.col_offset = col_offsets[i];
    if (v.num_slots > 0) rank_stride = std::max(rank_stride, v.max_rank);
  }
  a.rank_stride = a.in_dim == 0 || input.shape[0] == 0 || output.shape[0] == 0 ? 0 : rank_stride;
  return a;
}

// Experts of the slice with the most (the views may differ; one expert for dense LoRA).
int32_t widest_experts(const LoraArgs& a) {
  int32_t experts = 1;
  for (int i = 0; i < a.num_slices; ++i) experts = std::max(experts, a.slices[i].num_experts);
  return experts;
}

// Blocks a grouped launch is sized for. max_blocks (the outputs' length) is the worst case over
// every (slot, expert) group of the views, one padded block each; when the caller knows how many
// slots the step uses (active_slots > 0), the same bound over those slots' groups. H200 (bench
// NOTES, v3b): gpt-oss at 512 tokens, 4 adapters in 16-slot views, 272 -> 122 us, the mma
// kernel's cluster split having been sized for 536 blocks where ~158 could exist. Only the grid
// and split follow it: the kernels walk every block up to the device-side count.
int64_t launch_blocks(const LoraArgs& a, int64_t max_blocks, int64_t active_slots) {
  if (active_slots <= 0) return max_blocks;
  const auto slots = static_cast<int32_t>(std::min<int64_t>(active_slots, INT32_MAX));
  return std::min(max_blocks, moe_lora_align_max_blocks(a.num_pairs, widest_experts(a), slots,
                                                        a.block_m));
}

// Blocks a step is expected to fill, which sizes the mma kernel's cluster split: with pairs
// spread evenly over G (slot, expert) groups, G (1 - e^(-P/G)) groups receive a pair, and the
// rows fill about P / block_m more; capped by the bound. (The bound alone counts one padded
// block for every group: qwen3 at 128 tokens, 4 adapters, 544 where ~440 exist.)
int64_t expected_blocks(const LoraArgs& a, int64_t bound, int64_t active_slots) {
  int64_t slots = active_slots;
  if (active_slots <= 0) {
    for (int i = 0; i < a.num_slices; ++i) slots = std::max<int64_t>(slots, a.slices[i].num_slots);
  }
  const double groups = static_cast<double>(std::max<int64_t>(slots, 1) * widest_experts(a));
  const double pairs = static_cast<double>(a.num_pairs);
  const double filled = groups * -std::expm1(-pairs / groups) + pairs / a.block_m;
  return std::clamp<int64_t>(static_cast<int64_t>(filled), 1, std::max<int64_t>(bound, 1));
}

void lora_delta(const TensorRef& input, int32_t input_pairs_per_row, const TensorRef& output,
                const TensorRef& topk_weights, const TensorRef& sorted_pairs,
                const TensorRef& block_slot, const TensorRef& block_expert,
                const TensorRef& num_blocks, int32_t block_m,
                const std::vector<LoraSiteView>& slices, const std::vector<int64_t>& col_offsets,
                void* stream_ptr, int64_t active_slots) {
  cudaStream_t stream = detail::as_stream(stream_ptr);
  const int64_t max_blocks = block_slot.shape[0];
  LoraArgs a = common_args(input, input_pairs_per_row, output, topk_weights, slices, col_offsets);
  if (max_blocks == 0 || a.rank_stride == 0) return;
  a.sorted_pairs = static_cast<const int32_t*>(sorted_pairs.data);
  a.pairs_stride = sorted_pairs.stride[0];
  a.block_slot = static_cast<const int32_t*>(block_slot.data);
  a.block_slot_stride = block_slot.stride[0];
  a.block_expert = is_absent(block_expert) ? nullptr : static_cast<const int32_t*>(block_expert.data);
  a.block_expert_stride = is_absent(block_expert) ? 0 : block_expert.stride[0];
  a.num_blocks = static_cast<const int32_t*>(num_blocks.data);
  a.block_m = block_m;
  const LoraVectorization vec = vectorization(a, input, output);
  // Each specialised launcher may still decline (returns false); split-K takes anything.
  switch (choose_lora_kernel(a, input.dtype, vec)) {
    case LoraKernel::kMma: {
      const int64_t bound = launch_blocks(a, max_blocks, active_slots);
      if (launch_lora_mma(a, input.dtype, vec, max_blocks, bound,
                          expected_blocks(a, bound, active_slots), stream)) {
        return;
      }
      break;
    }
    case LoraKernel::kCluster:
      if (launch_lora_cluster(a, input.dtype, vec, max_blocks,
                              launch_blocks(a, max_blocks, active_slots), stream)) {
        return;
      }
      break;
    case LoraKernel::kSplitK:
      break;
  }
  launch_lora_splitk(a, input.dtype, vec, max_blocks, stream);
}

}  // namespace

void fused_moe_lora(const TensorRef& input, int32_t input_pairs_per_row, const TensorRef& output,
                    const TensorRef& topk_weights, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, int32_t block_m,
                    const std::vector<LoraSiteView>& slices,
                    const std::vector<int64_t>& col_offsets, void* stream,
                    int64_t active_slots) {
  lora_delta(input, input_pairs_per_row, output, topk_weights, sorted_pairs, block_slot,
             block_expert, num_blocks, block_m, slices, col_offsets, stream, active_slots);
}

void dense_lora(const TensorRef& input, const TensorRef& output, const TensorRef& sorted_rows,
                const TensorRef& block_slot, const TensorRef& num_blocks, int32_t block_m,
                const std::vector<LoraSiteView>& slices, const std::vector<int64_t>& col_offsets,
                void* stream) {
  const TensorRef no_weights{};
  const TensorRef expert_zero{};
  lora_delta(input, /*input_pairs_per_row=*/1, output, no_weights, sorted_rows, block_slot,
             expert_zero, num_blocks, block_m, slices, col_offsets, stream, /*active_slots=*/0);
}

}  // namespace moelora::cuda

namespace moelora::cuda {

void fused_moe_lora_unsorted(const TensorRef& input, int32_t input_pairs_per_row,
                             const TensorRef& output, const TensorRef& topk_weights,
                             const TensorRef& topk_ids, const TensorRef& token_slot,
                             const std::vector<LoraSiteView>& slices,
                             const std::vector<int64_t>& col_offsets, void* stream) {
  LoraArgs a = common_args(input, input_pairs_per_row, output, topk_weights, slices, col_offsets);
  if (a.rank_stride == 0) return;
  a.token_slot = static_cast<const int32_t*>(token_slot.data);
  a.token_slot_stride = token_slot.stride[0];
  a.top_k = is_absent(topk_ids) ? 1 : static_cast<int32_t>(topk_ids.shape[1]);
  if (!is_absent(topk_ids)) {
    // pair p = t * K + k; the kernel reads pair_expert[p * stride] on a contiguous [T, K] view
    if (topk_ids.stride[1] != 1 || topk_ids.stride[0] != topk_ids.shape[1]) {
      throw InvalidArgument("fused_moe_lora_unsorted: topk_ids must be contiguous, got " +
                            topk_ids.describe());
    }
    a.pair_expert = static_cast<const int32_t*>(topk_ids.data);
    a.pair_expert_stride = 1;
  }
  if (!launch_lora_cluster(a, input.dtype, vectorization(a, input, output), a.num_pairs,
                           a.num_pairs, detail::as_stream(stream))) {
    throw InvalidArgument("fused_moe_lora_unsorted: the ranks of these slices need more shared "
                          "memory than one SM has; use moe_lora_align + fused_moe_lora");
  }
}

}  // namespace moelora::cuda
