// moe_lora_align over several CTAs, for large steps (the default from kMultiCtaMinPairs pairs:
// moe_lora_align.cu). Same outputs and rules as the one-CTA form (moe_lora_align.cu), three launches on
// the stream, no host sync (graph-capturable):
//   1. count: C CTAs, each a contiguous chunk of pairs, count pairs per group in shared memory
//      and store the histogram as row c of counts [C][G]; together they fill the outputs with -1;
//   2. scan: one CTA sums each group's column, assigns blocks in (slot, expert) order (the shared
//      assign_blocks) and turns column g into each chunk's first output row in that group
//      (chunk c's rows follow chunks 0..c-1's);
//   3. scatter: the same C chunks place their pairs from those rows with shared-memory atomics.
// Why: the one-CTA form spends 74 us at 32768 pairs on the H200 (ncu: stalls on its
// shared-memory atomics, one SM doing all of them; bench/NOTES.md, v3b). Here each SM handles
// ~P / C pairs; the scan reads C * G counters.
// Workspace: counts, C * G int32, stream-ordered scratch (detail::scratch_alloc).
#include <algorithm>

#include "moe_lora_align.cuh"

namespace moelora::cuda::align {

namespace {

constexpr int kChunkThreads = 512;
constexpr int kScanThreads = 1024;
constexpr int64_t kMinPairsPerChunk = 1024;

struct MultiArgs {
  AlignArgs a;
  int32_t* counts;  // [num_chunks][num_groups]: pair counts, then first rows (after the scan)
  int64_t num_groups, chunk;  // pairs per chunk (the last may be short)
};

__device__ __forceinline__ int64_t num_pairs_of(const AlignArgs& a) {
  return a.num_tokens * a.top_k;
}

__global__ void __launch_bounds__(kChunkThreads) count_chunks_kernel(MultiArgs m) {
  extern __shared__ int32_t hist[];
  const AlignArgs& a = m.a;
  const int64_t tid = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  fill_outputs(a, tid, int64_t{gridDim.x} * blockDim.x);
  for (int64_t g = threadIdx.x; g < m.num_groups; g += blockDim.x) hist[g] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * m.chunk;
  count_pairs(a, begin, detail::min64(num_pairs_of(a), begin + m.chunk), hist);
  __syncthreads();
  int32_t* row = m.counts + blockIdx.x * m.num_groups;
  for (int64_t g = threadIdx.x; g < m.num_groups; g += blockDim.x) row[g] = hist[g];
}

__global__ void __launch_bounds__(kScanThreads) scan_chunks_kernel(MultiArgs m, int64_t chunks) {
  assign_blocks(
      m.a,
      [&](int64_t g) {
        int64_t total = 0;
        for (int64_t c = 0; c < chunks; ++c) total += m.counts[c * m.num_groups + g];
        return total;
      },
      [&](int64_t g, int64_t row) {
        for (int64_t c = 0; c < chunks; ++c) {
          const int32_t n = m.counts[c * m.num_groups + g];
          m.counts[c * m.num_groups + g] = static_cast<int32_t>(row);
          row += n;
        }
      });
}

__global__ void __launch_bounds__(kChunkThreads) scatter_chunks_kernel(MultiArgs m) {
  extern __shared__ int32_t next_row[];
  const AlignArgs& a = m.a;
  const int32_t* first = m.counts + blockIdx.x * m.num_groups;
  for (int64_t g = threadIdx.x; g < m.num_groups; g += blockDim.x) next_row[g] = first[g];
  __syncthreads();
  const int64_t begin = blockIdx.x * m.chunk;
  place_pairs(a, begin, detail::min64(num_pairs_of(a), begin + m.chunk), next_row);
}

}  // namespace

bool launch_align_multi(const AlignArgs& a, cudaStream_t stream) {
  MultiArgs m{};
  m.a = a;
  m.num_groups = int64_t{a.num_slots} * a.num_experts;
  if (m.num_groups <= 0 || m.num_groups > kMaxSmemGroups) return false;
  const int64_t num_pairs = a.num_tokens * a.top_k;
  // About one chunk per SM, none shorter than kMinPairsPerChunk.
  m.chunk = std::max(kMinPairsPerChunk, (num_pairs + detail::sm_count() - 1) / detail::sm_count());
  const int64_t chunks = std::max<int64_t>(1, (num_pairs + m.chunk - 1) / m.chunk);
  const size_t smem = static_cast<size_t>(m.num_groups) * sizeof(int32_t);
  if (smem > 48 * 1024) {
    for (const void* kernel : {reinterpret_cast<const void*>(count_chunks_kernel),
                               reinterpret_cast<const void*>(scatter_chunks_kernel)}) {
      MOELORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
    }
  }
  m.counts = static_cast<int32_t*>(
      detail::scratch_alloc(chunks * m.num_groups * sizeof(int32_t), stream));
  const unsigned grid = static_cast<unsigned>(chunks);
  count_chunks_kernel<<<grid, kChunkThreads, smem, stream>>>(m);
  scan_chunks_kernel<<<1, kScanThreads, 0, stream>>>(m, chunks);
  scatter_chunks_kernel<<<grid, kChunkThreads, smem, stream>>>(m);
  detail::scratch_free(m.counts, stream);
  return true;
}

}  // namespace moelora::cuda::align
