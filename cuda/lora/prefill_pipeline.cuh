// Tiles, swizzle and the cp.async pipeline of the tensor-core LoRA kernel (lora/prefill.cu):
// its constants, the host-built pass plan, and the device helpers its main loop and epilogue
// share. Included by lora/prefill.cu only.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/cluster.cuh"
#include "common/ptx.cuh"
#include "lora/args.cuh"

namespace moelora::cuda::prefill {

using namespace ptx;  // NOLINT: the PTX wrappers read best unqualified here

constexpr int kMaxWarps = 4;
constexpr int kMaxN = 128;                // columns of a pass (summed, padded ranks)
constexpr int kMaxRank = 64;
constexpr int kChunk = 64;   // K chunk of the shrink and column tile of the expand (elements)
constexpr int kRowBytes = kChunk * 2;  // one 128-byte shared-memory row of a stage
// Stages of the cp.async pipeline: with shared memory bounding residency, bytes in flight per SM
// are (stages - 1) / stages of it, so depth beats CTA count (4 over 3: docs/performance.md,
// "Tensor-core kernel").
constexpr int kStages = 4;
static_assert(kStages >= 2, "the pipeline needs at least two stages");
// CTAs per SM that registers must allow at each N: what the stages' shared memory allows with 4
// warps (4 at N = 32, 3 at 64, 2 at 128). Without it ptxas takes 144-148 registers at N = 32
// (3 CTAs per SM); 128 fit without spills.
template <int N>
constexpr int kMinCtasPerSm = N <= 32 ? 4 : N <= 64 ? 3 : 2;

// Slices grouped into passes (consecutive slices), built on the host.
struct MmaPlan {
  int32_t num_passes;
  int32_t pass_begin[kMaxSlices + 1];
  int32_t base[kMaxSlices];  // first column of slice i in its pass (multiple of 16)
  int32_t rp[kMaxSlices];    // columns of slice i: max_rank rounded up to 16 (0: no slots)
};

// ---- shared-memory tiles and pair helpers -----------------------------------------------------

// Byte offset of 16-byte chunk `ch` (0..7) of row `row` in a tile of 128-byte rows.
__device__ __forceinline__ uint32_t swz(int row, int ch) {
  return static_cast<uint32_t>(row * kRowBytes + ((ch ^ (row & 7)) << 4));
}

// hi = T(x), lo = T(x - hi), per element of the pair.
template <typename T>
__device__ __forceinline__ void split2(float x, float y, uint32_t& hi, uint32_t& lo) {
  hi = pack2<T>(x, y);
  const float2 h = unpack2<T>(hi);
  lo = pack2<T>(x - h.x, y - h.y);
}

// 2^e as a float, e clamped to the normal range.
__device__ __forceinline__ float pow2(int e) {
  e = max(-126, min(127, e));
  return __uint_as_float(static_cast<uint32_t>(e + 127) << 23);
}

// A kStages-deep cp.async pipeline over steps 0..n-1: load(step, stage) issues the copies of a
// step, compute(step, stage) consumes them; loads run kStages - 1 steps ahead. A pass runs its
// shrink and its expands as ONE pipeline (pipeline_fill once, pipeline_steps for the shrink's
// steps, the hand-over in registers, pipeline_steps for the expand's), so the first expand
// tiles are in flight while the last K chunks are multiplied (no drain and refill between the
// phases or between slices, each a memory latency).
template <typename Load>
__device__ __forceinline__ void pipeline_fill(int first, int n, Load&& load) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (first + s < n) load(first + s, (first + s) % kStages);
    cp_async_commit();
  }
}

// Steps [begin, end) of a pipeline of n steps, filled from `begin` or continuing one that ran
// up to begin: one commit group per step, so waiting for all but kStages - 2 groups lands step
// `it`; one barrier per step, after which stage (it - 1) % kStages is free for a new load.
template <typename Load, typename Compute>
__device__ __forceinline__ void pipeline_steps(int begin, int end, int n, Load&& load,
                                               Compute&& compute) {
  for (int it = begin; it < end; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = it + kStages - 1;
    if (next < n) load(next, next % kStages);
    cp_async_commit();
    compute(it, it % kStages);
  }
}

// Waits for every copy and every thread: the stages may then be reused for something else.
__device__ __forceinline__ void pipeline_drain() {
  cp_async_wait<0>();
  __syncthreads();
}

// Dynamic shared memory after the stages: per tile row, its input and output row pointers and
// its routing weight (sized by the CTA's rows, so 1-warp CTAs keep 8 per SM at N = 32); then
// the item's adapter row tables, every slice's whole entry of (slot, expert) as byte offsets,
// [slice][A, B][rank_stride].
__host__ __device__ constexpr size_t row_tables_bytes(int rows) {
  return static_cast<size_t>(rows) * (2 * sizeof(void*) + sizeof(float));
}
__host__ __device__ inline size_t dynamic_tables_bytes(int rows, const LoraArgs& a) {
  return row_tables_bytes(rows) + sizeof(int64_t) * a.num_slices * 2 * a.rank_stride;
}

// 64-column tiles [begin, end) of a slice that column part cs of csplit expands: contiguous
// shares that cover the slice's tiles exactly once over the parts.
struct TileRange {
  int64_t begin, end;
};
__device__ __forceinline__ TileRange part_tiles(int64_t out_dim, int64_t cs, int64_t csplit) {
  const int64_t nt = (out_dim + kChunk - 1) / kChunk;
  return TileRange{nt * cs / csplit, nt * (cs + 1) / csplit};
}

// acc += the same thread's acc in every other CTA of the cluster, in rank order (so repeated
// runs are bit-identical), through `scratch` (the stage memory: pipeline_drain() left it free).
template <int NT>
__device__ __forceinline__ void cluster_sum(float (&acc)[NT][4], float* scratch) {
  const Cluster cluster;
  const int tid = static_cast<int>(threadIdx.x);
  const int nthreads = static_cast<int>(blockDim.x);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int q = 0; q < 4; ++q) scratch[(j * 4 + q) * nthreads + tid] = acc[j][q];
  }
  cluster.sync();  // every partial is written
  for (int r = 0; r < cluster.size(); ++r) {
    const float* part = cluster.peer(scratch, r);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float v = part[(j * 4 + q) * nthreads + tid];
        acc[j][q] = r == 0 ? v : acc[j][q] + v;
      }
    }
  }
  cluster.sync();  // no peer still reads this CTA's scratch when the expand reuses it
}

}  // namespace moelora::cuda::prefill
