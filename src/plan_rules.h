// Internal: the launch-level rules of the plan (include/moelora/plan.h), the part of each choice
// that depends on the site's dimensions, the compiled kernel's occupancy or the launch's size.
// The launchers in cuda/ call these and decide nothing themselves; every threshold lives in
// src/plan.cpp. Why each rule is what it is: docs/performance.md.
#pragma once

#include <cstdint>
#include <functional>

#include "moelora/plan.h"

namespace moelora::plan_rules {

// MOELORA_PLAN, parsed once: the debugging overrides every plan applies under its typed ones.
const PlanOverrides& environment_overrides();

// ---- the decode kernel (cuda/lora/decode.cu) ----------------------------------------------------
constexpr int kMaxPortableCluster = 8;
constexpr int kMaxNonPortableCluster = 16;  // sm_90's limit with the non-portable opt-in

// The widest cluster the decode kernel may take for a site of `in_dim` inputs: 1 before sm_90,
// plan.cluster_max when set, else 16 where each of 16 CTAs keeps enough of in_dim, else 8.
int32_t decode_cluster_limit(int64_t in_dim, const LoraPlan& plan, const DeviceProps& device);

// Input elements a CTA stages per pass when `cluster_size` CTAs split in_dim.
int64_t decode_piece(int64_t in_dim, int cluster_size);

struct DecodeShape {
  int cluster_size;           // C: CTAs splitting in_dim (and the columns of a group)
  int column_groups;          // G: clusters per item, each expanding 1/G of the columns
  int64_t piece;              // input elements staged per pass
  int64_t resident_clusters;  // clusters of C CTAs the GPU holds at once (one wave)
};

// Clusters of `cluster_size` CTAs of the instantiated kernel, staging `piece` inputs a pass,
// that the GPU holds at once (the occupancy API; with cluster_size 1, resident CTAs).
using ResidentClusters = std::function<int64_t(int cluster_size, int64_t piece)>;

// C and G for `num_items` work items: the widest C (<= cluster_limit, each CTA keeping >= 256
// inputs) whose clusters, one per item, all fit in one wave; G column groups while CTAs keep a
// warp of column vectors each, within that wave.
DecodeShape decode_shape(int64_t in_dim, int64_t out_width, int elem_bytes, int vec_bytes,
                         int64_t num_items, int32_t cluster_limit,
                         const ResidentClusters& resident);

// ---- grouped launches -------------------------------------------------------------------------
// Blocks a grouped launch is sized for: max_blocks (the outputs' length), or, when the step's
// adapter count is known (active_slots > 0), the same bound over those adapters' groups.
int64_t launch_blocks(int64_t max_blocks, int64_t num_pairs, int32_t num_experts,
                      int64_t active_slots, int32_t block_m);

// Blocks a step is expected to fill when its pairs spread evenly over slots x experts groups,
// capped by `bound`.
int64_t expected_blocks(int64_t num_pairs, int64_t slots, int32_t num_experts, int32_t block_m,
                        int64_t bound);

// ---- the tensor-core kernel (cuda/lora/prefill.cu) ---------------------------------------------
struct MmaSplitShape {
  int64_t widest_tiles;    // 64-column tiles of the widest slice that has a rank
  int64_t k_chunks;        // 64-element chunks of in_dim
  int64_t expected_items;  // (block, M tile) items expected to hold rows
  int warps;               // warps per CTA (1-4)
};

// CTAs per (block, M tile) item, a thread-block cluster that splits the shrink's K chunks and
// the expand's column tiles: plan.mma_split when set, 1 before sm_90.
int32_t mma_cluster_split(const MmaSplitShape& shape, const LoraPlan& plan,
                          const DeviceProps& device);

// ---- paged attention (cuda/attention/) ----------------------------------------------------------
// Whether `kernel` serves this shape (the arena's 16-byte alignment is the launcher's check).
bool attention_kernel_fits(AttentionKernel kernel, const AttentionStep& step,
                           const DeviceProps& device);

// Keys a split-KV split takes at least (also the kernels' cap on the splits a short context
// uses: AttnArgs::min_keys_per_split).
constexpr int32_t kMinKeysPerSplit = 256;

// Split-KV factor (cluster size) for `ctas` CTAs over contexts of up to max_context keys:
// plan.splits when set; else ~2 waves of CTAs, or, given the CTAs the GPU holds at once
// (resident_ctas > 0), at most one wave; >= 256 keys a split; 1 before sm_90.
int32_t attention_splits(int64_t ctas, int64_t max_context, int64_t resident_ctas,
                         const AttentionPlan& plan, const DeviceProps& device);

}  // namespace moelora::plan_rules
