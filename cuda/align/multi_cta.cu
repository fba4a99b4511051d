// moe_lora_align over several CTAs, for large steps (the plan's choice from 4096 pairs). Same
// outputs and rules as the one-CTA form (align/single_cta.cu), in ONE cooperative launch of C CTAs
// (C <= the SM count, one CTA per SM, so all are resident) with two grid-wide barriers, no host
// sync (graph-capturable: a cooperative kernel node):
//   1. count: CTA c counts its contiguous chunk of pairs per group in shared memory and stores
//      the histogram as row c of counts [C][G]; together the CTAs fill the outputs with -1;
//   2. prefix: a team of lanes per group turns column g into each chunk's offset within the
//      group (chunk c's pairs follow chunks 0..c-1's, a warp scan over the chunks) and its
//      total;
//   3. place: every CTA assigns blocks to groups from the totals (the shared assign_blocks, the
//      same result in each; CTA 0 writes block_slot / block_expert / num_blocks), so its next
//      row of group g is first_row(g) + its offset; it places its chunk's pairs from there with
//      shared-memory atomics.
// Why one launch: a separate count, scan and scatter pay the launch floor three times, and a
// scan in one CTA walks the C counters of each group serially. Here the serial work per group is
// C / width team steps and the launch floor is paid once; that floor (~14 us against ~8 for the
// one-CTA form) is why small steps keep the one-CTA form (docs/performance.md, "Alignment").
// Workspace: counts, C * G int32, plus G totals: the caller's (moe_lora_align's `workspace`), or
// stream-ordered scratch (detail::scratch_alloc), whose free node in a captured graph would sit
// between this kernel and the LoRA kernel after it and cost that kernel its early start.
#include <cooperative_groups.h>

#include <algorithm>

#include "align/align.cuh"
#include "common/kernel_modules.cuh"
#include "common/launch.cuh"

namespace moelora::cuda::align {

namespace {

constexpr int kThreads = 512;
constexpr int64_t kMinPairsPerChunk = 512;

struct MultiArgs {
  AlignArgs a;
  int32_t* counts;  // [chunks][num_groups]: pair counts, then offsets within each group
  int32_t* totals;  // [num_groups]: pairs per group
  int64_t num_groups, chunk;  // pairs per chunk (the last may be short)
};

// Lanes per group in the prefix step: the power of two >= the chunk count, at most 32.
__device__ __forceinline__ int team_width(int64_t chunks) {
  int width = 1;
  while (width < 32 && width < chunks) width *= 2;
  return width;
}

// Column g of counts [chunks][G] becomes exclusive prefix sums in chunk order, and totals[g]
// its sum, for every group: a team of `width` lanes (a power of two <= 32, about the chunk
// count) per group, segmented warp scans over the chunks `width` at a time. Lanes per group
// scale with the chunks so that neither few chunks (one CTA: 2048 groups) nor many (128 chunks)
// make a long serial walk (one warp per group walks 128 groups one L2 round trip at a time when
// there is one chunk).
__device__ __forceinline__ void chunk_offsets(int32_t* counts, int32_t* totals,
                                              int64_t num_groups, int64_t chunks, int width) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int r = lane % width;  // this lane's rank in its team
  const int64_t per_warp = 32 / width;
  const int64_t warp = blockIdx.x * int64_t{blockDim.x / 32} + threadIdx.x / 32;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  // Loop bounds are uniform over the warp (the shuffles need every lane); g past the groups
  // loads and stores nothing.
  for (int64_t g0 = warp * per_warp; g0 < num_groups; g0 += warps * per_warp) {
    const int64_t g = g0 + lane / width;
    const bool mine = g < num_groups;
    int32_t running = 0;
    for (int64_t base = 0; base < chunks; base += width) {
      const int64_t c = base + r;
      const bool here = mine && c < chunks;
      const int32_t n = here ? counts[c * num_groups + g] : 0;
      int32_t inclusive = n;
      for (int offset = 1; offset < width; offset <<= 1) {
        const int32_t other = __shfl_up_sync(0xffffffffu, inclusive, offset, width);
        if (r >= offset) inclusive += other;
      }
      if (here) counts[c * num_groups + g] = running + inclusive - n;
      running += __shfl_sync(0xffffffffu, inclusive, width - 1, width);
    }
    if (mine && r == 0) totals[g] = running;
  }
}

__global__ void __launch_bounds__(kThreads) align_multi_kernel(MultiArgs m) {
  extern __shared__ int32_t hist[];  // this CTA's counts per group, then its next rows
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const AlignArgs& a = m.a;
  const int64_t chunks = gridDim.x;
  const int64_t c = blockIdx.x;
  const int64_t num_pairs = a.num_tokens * a.top_k;
  const int64_t begin = c * m.chunk;
  const int64_t end = detail::min64(num_pairs, begin + m.chunk);

  // 1. count
  fill_outputs(a, c * blockDim.x + threadIdx.x, chunks * blockDim.x);
  for (int64_t g = threadIdx.x; g < m.num_groups; g += blockDim.x) hist[g] = 0;
  __syncthreads();
  count_pairs(a, begin, end, hist);
  __syncthreads();
  int32_t* row = m.counts + c * m.num_groups;
  for (int64_t g = threadIdx.x; g < m.num_groups; g += blockDim.x) row[g] = hist[g];
  grid.sync();

  // 2. offsets of each chunk within each group, and the groups' totals
  chunk_offsets(m.counts, m.totals, m.num_groups, chunks, team_width(chunks));
  grid.sync();

  // 3. blocks (every CTA, the same), then this chunk's pairs
  assign_blocks(
      a, [&](int64_t g) { return int64_t{m.totals[g]}; },
      [&](int64_t g, int64_t first) { hist[g] = static_cast<int32_t>(first + row[g]); },
      /*write_blocks=*/c == 0);
  // Launched normally (a cooperative launch needs every CTA resident, which an early start
  // behind a running kernel would not give), but the LoRA kernel after it may start early.
  release_next_grid();
  place_pairs(a, begin, end, hist);
}

// Pairs per chunk: at most one chunk per SM (one CTA each: all resident, as the grid barriers
// need), none shorter than kMinPairsPerChunk.
int64_t chunk_pairs(int64_t num_pairs) {
  return std::max(kMinPairsPerChunk, (num_pairs + detail::sm_count() - 1) / detail::sm_count());
}

int64_t chunk_count(int64_t num_pairs) {
  const int64_t chunk = chunk_pairs(num_pairs);
  return std::max<int64_t>(1, (num_pairs + chunk - 1) / chunk);
}

}  // namespace

size_t multi_workspace_bytes(int64_t num_pairs, int64_t num_groups) {
  if (num_groups <= 0 || num_groups > kMaxSmemGroups || !detail::cooperative_launch()) return 0;
  return static_cast<size_t>((chunk_count(num_pairs) + 1) * num_groups) * sizeof(int32_t);
}

bool launch_align_multi(const AlignArgs& a, cudaStream_t stream, void* workspace,
                        size_t workspace_bytes) {
  MultiArgs m{};
  m.a = a;
  m.num_groups = int64_t{a.num_slots} * a.num_experts;
  const int64_t num_pairs = a.num_tokens * a.top_k;
  const size_t needed = multi_workspace_bytes(num_pairs, m.num_groups);
  if (needed == 0) return false;
  m.chunk = chunk_pairs(num_pairs);
  const int64_t chunks = chunk_count(num_pairs);
  const size_t smem = static_cast<size_t>(m.num_groups) * sizeof(int32_t);
  if (smem > 48 * 1024) {
    detail::allow_dynamic_smem(align_multi_kernel, smem);
  }
  const bool own = workspace == nullptr || workspace_bytes < needed;
  m.counts = static_cast<int32_t*>(own ? detail::scratch_alloc(needed, stream) : workspace);
  m.totals = m.counts + chunks * m.num_groups;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(chunks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute cooperative{};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  config.attrs = &cooperative;
  config.numAttrs = 1;
  MOELORA_CUDA_CHECK(cudaLaunchKernelEx(&config, align_multi_kernel, m));
  if (own) detail::scratch_free(m.counts, stream);
  return true;
}

}  // namespace moelora::cuda::align

MOELORA_KERNEL_MODULE()
