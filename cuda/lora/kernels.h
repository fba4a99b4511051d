// Launchers of the LoRA kernel families behind fused_moe_lora and dense_lora. lora/dispatch.cu
// builds the LoraArgs and launches the family the call's plan names (moelora/plan.h):
//   cluster (lora/decode.cu): decode; one thread-block cluster per work item, Split-K through
//            distributed shared memory, shrink and expand in one launch, no workspace;
//   mma     (lora/prefill.cu): prefill; tensor-core tiles, the rank-sized intermediate on chip;
//   splitk  (lora/fallback.cu): the general fallback (fp32, unaligned rows); CUDA cores and a
//            stream-ordered workspace.
// Each launcher takes validated arguments, the element type of input/output/weights and the
// plan (PDL, and the cluster shapes' overrides).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lora/args.cuh"
#include "moelora/dtype.h"
#include "moelora/plan.h"

namespace moelora::cuda {

// Whether the rows and columns allow 16-byte vector access for element size `elem_bytes`.
struct LoraVectorization {
  bool input;   // input rows 16-byte aligned and in_dim a multiple of the vector
  bool output;  // output rows and every slice's columns likewise
};

// Grouped form only. `max_blocks` = len(block_slot). Allocates and frees its workspace on the
// stream (stream-ordered, graph-capturable).
void launch_lora_splitk(LoraArgs& a, DType dtype, LoraVectorization vec, int64_t max_blocks,
                        const LoraPlan& plan, cudaStream_t stream);

// Either form; `num_items` = max_blocks (grouped) or num_pairs (unsorted). Any dtype and
// layout; returns false (launching nothing) only when the ranks need more shared memory than
// an SM has (sum of max ranks over slices in the thousands). `launch_items` (<= num_items) sizes
// the grid and the cluster shape: the items expected to hold work (plan_rules::launch_blocks);
// the kernel walks all num_items grid-stride, so results never depend on it.
bool launch_lora_cluster(const LoraArgs& a, DType dtype, LoraVectorization vec, int64_t num_items,
                         int64_t launch_items, const LoraPlan& plan, cudaStream_t stream);

// Grouped form, 16-bit dtypes, full vectorization; returns false when the call does not qualify.
// `launch_blocks` (<= max_blocks) sizes the grid, as for the cluster kernel; `expected_blocks`
// (<= launch_blocks), the blocks the step is expected to fill, sizes the cluster split.
bool launch_lora_mma(const LoraArgs& a, DType dtype, LoraVectorization vec, int64_t max_blocks,
                     int64_t launch_blocks, int64_t expected_blocks, const LoraPlan& plan,
                     cudaStream_t stream);

}  // namespace moelora::cuda
