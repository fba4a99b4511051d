// moe_lora_align on the GPU: a counting sort of the (token, k) pairs by (slot, expert) group in
// one CTA of 1024 threads, with fixed-size outputs and no host sync (graph-capturable).
//   1. fill the outputs with -1 and zero the per-group counters;
//   2. count pairs per group (shared-memory atomics when the counters fit, else global);
//   3. blocks per group = ceil(count / block_m), exclusive scan over groups (block-wide scan of
//      per-thread partial sums), write block_slot / block_expert, turn each counter into the
//      group's first output row, write num_blocks;
//   4. scatter: each pair takes the next row of its group with an atomic increment.
// Within a group the order of pair ids is the order the atomics resolve (not the CPU's ascending
// order); the set of pairs of every block, and every per-row result downstream, is the same.
// Pairs with slot -1 (base model) are left out; out-of-range slot or expert ids are skipped too
// (the GPU cannot throw; the CPU reference reports them).
// Cost: O(P / 8192 + G / 1024) memory latencies of one CTA (each thread loads 8 pairs' ids
// before its atomics); at decode (a few pairs) it is launch-bound. Large steps may take the
// multi-CTA form instead (align/multi_cta.cu; see multi_cta_wanted).
#include <algorithm>
#include <cstdlib>
#include <string>

#include "common/common.cuh"
#include "kernels/dispatch.h"
#include "common/launch.cuh"
#include "align/align.cuh"

namespace moelora::cuda {

namespace {

using namespace align;  // NOLINT: the shared pieces of both forms

constexpr int kAlignThreads = 1024;

__global__ void __launch_bounds__(kAlignThreads) moe_lora_align_kernel(AlignArgs a) {
  extern __shared__ int32_t smem_counts[];
  wait_for_previous_grid();  // memory only from here (common/launch.cuh)
  int32_t* counts = a.global_counts != nullptr ? a.global_counts : smem_counts;
  const int64_t num_groups = int64_t{a.num_slots} * a.num_experts;
  const int64_t num_pairs = a.num_tokens * a.top_k;

  for (int64_t g = threadIdx.x; g < num_groups; g += blockDim.x) counts[g] = 0;
  fill_outputs(a, threadIdx.x, blockDim.x);
  __syncthreads();
  count_pairs(a, 0, num_pairs, counts);
  __syncthreads();
  assign_blocks(
      a, [&](int64_t g) { return int64_t{counts[g]}; },
      [&](int64_t g, int64_t row) { counts[g] = static_cast<int32_t>(row); });  // next row
  release_next_grid();  // the LoRA kernel's CTAs start while the pairs are placed
  place_pairs(a, 0, num_pairs, counts);
}

// From this many pairs the multi-CTA form (align/multi_cta.cu, one cooperative launch) is
// the faster one. H200, the align alone (tools/align_study.py, graph replays, L2 flushed, 128
// experts, 4 / 16 adapters; bench/NOTES.md, v3g): at 2048 pairs one CTA 14.3-14.7 us vs multi
// 15.4-16.0; at 4096 18.8-19.2 vs 15.6-16.2; at 65536 154 vs 26-28.
constexpr int64_t kMultiCtaMinPairs = 4096;

// MOELORA_ALIGN_KERNEL: "multi" or "single" forces a form (multi where it applies); unset, empty
// or "auto": multi from kMultiCtaMinPairs pairs. Read per call so tests can switch.
bool multi_cta_wanted(int64_t num_pairs) {
  const char* value = std::getenv("MOELORA_ALIGN_KERNEL");
  const std::string name = value != nullptr ? value : "auto";
  if (name == "multi") return true;
  if (name == "single") return false;
  if (name == "auto" || name.empty()) return num_pairs >= kMultiCtaMinPairs;
  throw InvalidArgument("MOELORA_ALIGN_KERNEL must be auto, single or multi, got '" + name + "'");
}

// Bytes of global counters the one-CTA form needs (its groups past shared memory's).
size_t single_workspace_bytes(int64_t num_groups) {
  return num_groups <= kMaxSmemGroups ? 0 : static_cast<size_t>(num_groups) * sizeof(int32_t);
}

}  // namespace

size_t moe_lora_align_workspace_bytes(int64_t num_pairs, int32_t num_experts, int32_t num_slots) {
  const int64_t num_groups = int64_t{num_slots} * num_experts;
  const size_t single = single_workspace_bytes(num_groups);
  if (!multi_cta_wanted(num_pairs)) return single;
  return std::max(single, align::multi_workspace_bytes(num_pairs, num_groups));
}

void moe_lora_align(const TensorRef& topk_ids, const TensorRef& token_slot, int32_t num_experts,
                    int32_t num_slots, int32_t block_m, const TensorRef& sorted_pairs,
                    const TensorRef& block_slot, const TensorRef& block_expert,
                    const TensorRef& num_blocks, void* stream, const TensorRef& workspace) {
  AlignArgs a{};
  const bool dense = topk_ids.data == nullptr && topk_ids.ndim == 0;
  a.topk_ids = dense ? nullptr : static_cast<const int32_t*>(topk_ids.data);
  a.topk_stride0 = dense ? 0 : topk_ids.stride[0];
  a.topk_stride1 = dense ? 0 : topk_ids.stride[1];
  a.top_k = dense ? 1 : static_cast<int32_t>(topk_ids.shape[1]);
  a.token_slot = static_cast<const int32_t*>(token_slot.data);
  a.slot_stride = token_slot.stride[0];
  a.num_tokens = token_slot.shape[0];
  a.num_experts = num_experts;
  a.num_slots = num_slots;
  a.block_m = block_m;
  a.sorted_pairs = static_cast<int32_t*>(sorted_pairs.data);
  a.sorted_stride = sorted_pairs.stride[0];
  a.sorted_len = sorted_pairs.shape[0];
  a.block_slot = static_cast<int32_t*>(block_slot.data);
  a.block_slot_stride = block_slot.stride[0];
  a.block_expert = static_cast<int32_t*>(block_expert.data);
  a.block_expert_stride = block_expert.stride[0];
  a.max_blocks = block_slot.shape[0];
  a.num_blocks = static_cast<int32_t*>(num_blocks.data);

  cudaStream_t s = detail::as_stream(stream);
  // The caller's workspace (sized by moe_lora_align_workspace_bytes; the public op checks it),
  // else stream-ordered scratch.
  const size_t given = workspace.data != nullptr
                           ? static_cast<size_t>(workspace.numel()) * dtype_size(workspace.dtype)
                           : 0;
  if (multi_cta_wanted(a.num_tokens * a.top_k) &&
      align::launch_align_multi(a, s, workspace.data, given)) {
    detail::check_launch("moe_lora_align (multi-CTA)");
    return;
  }
  const int64_t num_groups = int64_t{num_slots} * num_experts;
  size_t smem = 0;
  int32_t* scratch = nullptr;
  if (num_groups <= kMaxSmemGroups) {
    smem = static_cast<size_t>(detail::max64(num_groups, 1)) * sizeof(int32_t);
    if (smem > 48 * 1024) {
      detail::allow_dynamic_smem(moe_lora_align_kernel, kMaxSmemGroups * sizeof(int32_t));
    }
  } else if (given >= single_workspace_bytes(num_groups)) {
    a.global_counts = static_cast<int32_t*>(workspace.data);
  } else {
    scratch = static_cast<int32_t*>(detail::scratch_alloc(single_workspace_bytes(num_groups), s));
    a.global_counts = scratch;
  }
  launch_kernel(moe_lora_align_kernel, LaunchShape{dim3(1), dim3(kAlignThreads), smem, s, 1, true},
                a);
  detail::check_launch("moe_lora_align");
  detail::scratch_free(scratch, s);
}

}  // namespace moelora::cuda
