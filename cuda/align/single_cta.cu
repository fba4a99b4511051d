// moe_lora_align in one CTA of 1024 threads: a counting sort of the (token, k) pairs by (slot,
// expert) group, with fixed-size outputs and no host sync (graph-capturable).
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
// before its atomics); at decode (a few pairs) it is launch-bound. Large steps take the
// multi-CTA form (align/multi_cta.cu) by the plan's choice (align/dispatch.cu).
#include "align/align.cuh"
#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "common/launch.cuh"

namespace moelora::cuda::align {

namespace {

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

}  // namespace

size_t single_workspace_bytes(int64_t num_groups) {
  return num_groups <= kMaxSmemGroups ? 0 : static_cast<size_t>(num_groups) * sizeof(int32_t);
}

void launch_align_single(AlignArgs a, bool pdl, cudaStream_t stream, void* workspace,
                         size_t workspace_bytes) {
  const int64_t num_groups = int64_t{a.num_slots} * a.num_experts;
  size_t smem = 0;
  int32_t* scratch = nullptr;
  if (num_groups <= kMaxSmemGroups) {
    smem = static_cast<size_t>(detail::max64(num_groups, 1)) * sizeof(int32_t);
    if (smem > 48 * 1024) {
      detail::allow_dynamic_smem(moe_lora_align_kernel, kMaxSmemGroups * sizeof(int32_t));
    }
  } else if (workspace_bytes >= single_workspace_bytes(num_groups)) {
    a.global_counts = static_cast<int32_t*>(workspace);
  } else {
    scratch =
        static_cast<int32_t*>(detail::scratch_alloc(single_workspace_bytes(num_groups), stream));
    a.global_counts = scratch;
  }
  launch_kernel(moe_lora_align_kernel,
                LaunchShape{dim3(1), dim3(kAlignThreads), smem, stream, 1, pdl}, a);
  detail::check_launch("moe_lora_align");
  detail::scratch_free(scratch, stream);
}

}  // namespace moelora::cuda::align

MOELORA_KERNEL_MODULE()
