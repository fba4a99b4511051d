// What the paged-attention kernels share (attention/per_head.cu: one CTA per (token, query
// head); attention/gqa.cu and attention/mma.cu: one CTA per (token, KV head) serving its query
// heads, on CUDA cores / tensor cores; attention/kv_write.cu writes the pages): the KV page
// layout, the kernel arguments, each token's key range and its split-KV share, the merge of
// online-softmax states, and the launchers attention/dispatch.cu picks from.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "common/cluster.cuh"
#include "common/common.cuh"
#include "moelora/dtype.h"
#include "moelora/ops.h"
#include "moelora/plan.h"

namespace moelora::cuda {

constexpr int kAttnWarps = 4;

// A page holds K as [block_tokens][num_kv_heads][head_dim] followed by V in the same layout.
struct KvLayout {
  std::byte* arena;
  int64_t page_bytes;
  int32_t block_tokens, num_kv_heads, head_dim;
  int64_t half_page_elems;  // elements of the K part of a page
};

inline KvLayout kv_layout(const KvCacheView& cache) {
  KvLayout kv{};
  kv.arena = cache.arena;
  kv.page_bytes = cache.page_bytes;
  kv.block_tokens = cache.block_tokens;
  kv.num_kv_heads = cache.num_kv_heads;
  kv.head_dim = cache.head_dim;
  kv.half_page_elems = int64_t{cache.block_tokens} * cache.num_kv_heads * cache.head_dim;
  return kv;
}

template <typename T>
__device__ __forceinline__ T* kv_row(const KvLayout& kv, int64_t page, int64_t in_page,
                                     int64_t kv_head, bool is_value) {
  const int64_t elems = (in_page * kv.num_kv_heads + kv_head) * kv.head_dim +
                        (is_value ? kv.half_page_elems : 0);
  return reinterpret_cast<T*>(kv.arena + page * kv.page_bytes) + elems;
}

struct AttnArgs {
  void* out;  // [T, H, D] strides out_s0, out_s1
  int64_t out_s0, out_s1;
  const void* query;  // [T, H, D]
  int64_t query_s0, query_s1;
  const int32_t* query_seq;  // [T]
  int64_t query_seq_stride;
  const int32_t* query_pos;  // [T]
  int64_t query_pos_stride;
  const int32_t* block_table;  // [num_seqs, max_blocks_per_seq]
  int64_t bt_s0, bt_s1, max_blocks_per_seq;
  const int32_t* seq_lens;  // [num_seqs]
  int64_t seq_lens_stride, num_seqs;
  const float* sinks;  // [H] or null
  int64_t sinks_stride;
  float scale;
  int32_t sliding_window;
  int32_t num_heads;
  // Keys a split takes at least: a query with fewer than splits x this leaves the splits past
  // its need empty. The host sizes a split-KV cluster by the block table's width, which in a
  // captured graph is the longest context the graph serves, not this step's; 0 (a plan that
  // forces its splits): every split takes a share.
  int32_t min_keys_per_split;
  KvLayout kv;
};

// Keys token t sees: [first, last] (its window, causal), num_keys of them; this split's
// contiguous share [my_first, my_last] (empty for splits past what the keys need, see
// AttnArgs::min_keys_per_split); seq < 0 when the token has no valid sequence.
struct KeyRange {
  int64_t seq, first, last, num_keys, my_first, my_last;
};

__device__ __forceinline__ KeyRange key_range(const AttnArgs& a, int64_t t, int split,
                                              int splits) {
  KeyRange r{-1, 0, -1, 0, 0, -1};
  const int64_t seq = a.query_seq[t * a.query_seq_stride];
  const int64_t pos = a.query_pos[t * a.query_pos_stride];
  if (seq >= 0 && seq < a.num_seqs && pos >= 0) {
    const int64_t seq_len = detail::min64(a.seq_lens[seq * a.seq_lens_stride],
                                          a.max_blocks_per_seq * a.kv.block_tokens);
    r.seq = seq;
    r.last = min(pos, seq_len - 1);
    r.first = a.sliding_window > 0 ? detail::max64(0, pos - a.sliding_window + 1) : 0;
  }
  r.num_keys = detail::max64(0, r.last - r.first + 1);
  int64_t used = splits;
  if (a.min_keys_per_split > 0) {
    used = detail::min64(splits, detail::max64(1, (r.num_keys + a.min_keys_per_split - 1) /
                                                      a.min_keys_per_split));
  }
  const int64_t share = (r.num_keys + used - 1) / used;
  r.my_first = r.first + share * split;
  r.my_last = detail::min64(r.last, r.my_first + share - 1);
  return r;
}

// ---- merging online-softmax states (the GQA kernels) -----------------------------------------
// A state of one query head over some keys, in the log2 domain: m = max of logit * log2(e),
// l = sum of 2^(logit * log2(e) - m), acc[d] = the same sum weighted by v[d]. Laid out as
// [m, l, acc[0..D)] floats; m = -inf for a state that saw no key.
constexpr float kLog2e = 1.4426950408889634f;

// The warps' states ws[w][r] (`warps` x ws_rows of them) into the CTA's cs[r] for r < rows, one
// (row, dim) per thread and step. Call between barriers.
__device__ __forceinline__ void merge_warp_states(const float* ws, int warps, int ws_rows,
                                                  float* cs, int rows, int head_dim) {
  const int row_floats = 2 + head_dim;
  for (int idx = threadIdx.x; idx < rows * head_dim; idx += blockDim.x) {
    const int r = idx / head_dim, d = idx % head_dim;
    float m = -INFINITY;
    for (int w = 0; w < warps; ++w) m = fmaxf(m, ws[(w * ws_rows + r) * row_floats]);
    float l = 0.0f, acc = 0.0f;
    for (int w = 0; w < warps; ++w) {
      const float* state = ws + (w * ws_rows + r) * row_floats;
      const float f = state[0] == -INFINITY ? 0.0f : exp2f(state[0] - m);
      l += state[1] * f;
      acc += state[2 + d] * f;
    }
    if (d == 0) {
      cs[r * row_floats] = m;
      cs[r * row_floats + 1] = l;
    }
    cs[r * row_floats + 2 + d] = acc;
  }
}

// The cluster's CTA states cs[r] (same shared-memory offset in every CTA) into the outputs of
// query heads kv_head * ratio + r, r < ratio, by CTA 0 in rank order (deterministic), with each
// head's sink logit added to its denominator once. A token that sees no key writes zeros.
// Brackets the reads with cluster barriers: every CTA calls it.
template <typename T>
__device__ __forceinline__ void store_cluster_states(const Cluster& cluster, float* cs,
                                                     const AttnArgs& a, int64_t t, int kv_head,
                                                     int ratio, bool any_keys) {
  const int head_dim = a.kv.head_dim, row_floats = 2 + head_dim;
  cluster.sync();  // every CTA's state is written (a CTA barrier without a cluster)
  if (cluster.rank() == 0) {
    for (int idx = threadIdx.x; idx < ratio * head_dim; idx += blockDim.x) {
      const int r = idx / head_dim, d = idx % head_dim;
      const int h = kv_head * ratio + r;
      const float sink = a.sinks != nullptr ? a.sinks[h * a.sinks_stride] * kLog2e : -INFINITY;
      float big = sink;
      for (int s = 0; s < cluster.size(); ++s) {
        big = fmaxf(big, cluster.peer(cs, s)[r * row_floats]);
      }
      float denominator = a.sinks != nullptr ? exp2f(sink - big) : 0.0f;
      float sum = 0.0f;
      for (int s = 0; s < cluster.size(); ++s) {
        const float* state = cluster.peer(cs, s) + r * row_floats;
        if (state[0] == -INFINITY) continue;
        const float f = exp2f(state[0] - big);
        denominator += state[1] * f;
        sum += state[2 + d] * f;
      }
      const float inv = any_keys && denominator > 0.0f ? 1.0f / denominator : 0.0f;
      T* o = static_cast<T*>(a.out) + t * a.out_s0 + h * a.out_s1;
      o[d] = detail::from_f32<T>(sum * inv);
    }
  }
  cluster.sync();  // CTA 0 has read every peer's state before any CTA exits
}

// The launchers, called by attention/dispatch.cu only where plan_rules::attention_kernel_fits
// holds for their kernel and the arena is 16-byte aligned; each takes its split-KV factor from
// plan_rules::attention_splits.
// Tensor-core GQA kernel (attention/mma.cu): fp16/bf16, head_dim 64 or 128, <= 16 query heads
// per KV head.
void launch_paged_attention_mma(const AttnArgs& a, DType dtype, int64_t num_tokens,
                                const AttentionPlan& plan, cudaStream_t stream);
// CUDA-core GQA kernel (attention/gqa.cu): fp16/bf16, rows of 8, 16 or 32 16-byte vectors, <= 8
// query heads per KV head.
void launch_paged_attention_gqa(const AttnArgs& a, DType dtype, int64_t num_tokens,
                                const AttentionPlan& plan, cudaStream_t stream);
// Per-head kernel (attention/per_head.cu): any layout with head_dim <= 256 (InvalidArgument
// above), `splits` CTAs per (token, head).
void launch_paged_attention_per_head(const AttnArgs& a, DType dtype, int64_t num_tokens,
                                     int splits, cudaStream_t stream);

}  // namespace moelora::cuda
