// Paged KV cache on the GPU: kv_cache_write and paged_attention over the pool's KV pages.
//   A page holds K as [block_tokens][num_kv_heads][head_dim] followed by V in the same layout;
//   cache slot s lives in page s / block_tokens at offset s % block_tokens.
// kv_cache_write: one CTA per token copies its K and V rows (all kv heads) into the page.
// paged_attention: a cluster of S CTAs (split-KV, S <= 8) of 4 warps per (query token, query
//   head). The keys of the token's window [max(0, pos - window + 1), min(pos, seq_len - 1)] are
//   cut in S contiguous ranges, one per CTA, and dealt round-robin to its warps; a warp computes
//   <q, K_j> with lanes over head_dim (q held in registers, up to 8 elements a lane, so
//   head_dim <= 256) and keeps an online softmax (running max m, sum l, fp32 accumulator of V).
//   The 4 warp states merge in shared memory into the CTA's; CTA 0 of the cluster merges the S
//   CTA states through distributed shared memory (fixed order: repeated runs are identical) with
//   the sink logit (GPT-OSS) added to the denominator only. GQA: kv head = head / (num_heads /
//   num_kv_heads). A query that sees no key writes zeros (the CPU reference's rule).
//   Why split-KV: at decode a few long sequences give only tokens x heads CTAs (one sequence of a
//   32-head model: 32 CTAs on 132 SMs), each streaming the whole context; S is chosen on the
//   host to fill ~2 waves, bounded by the block table's width (>= 256 keys per split).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "common/cluster.cuh"
#include "common/common.cuh"
#include "attention/attention.cuh"
#include "kernels/dispatch.h"

namespace moelora::cuda {

namespace {

constexpr int kMaxDimsPerLane = 8;  // head_dim <= 256

template <typename T>
__global__ void kv_cache_write_kernel(const T* key, int64_t key_s0, int64_t key_s1,
                                      const T* value, int64_t value_s0, int64_t value_s1,
                                      const int64_t* slot_mapping, int64_t slot_stride,
                                      KvLayout kv) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t * slot_stride];
  if (slot < 0) return;
  const int64_t page = slot / kv.block_tokens;
  const int64_t in_page = slot % kv.block_tokens;
  const int64_t row_elems = int64_t{kv.num_kv_heads} * kv.head_dim;
  for (int64_t i = threadIdx.x; i < row_elems; i += blockDim.x) {
    const int64_t g = i / kv.head_dim;
    const int64_t d = i % kv.head_dim;
    kv_row<T>(kv, page, in_page, g, false)[d] = key[t * key_s0 + g * key_s1 + d];
    kv_row<T>(kv, page, in_page, g, true)[d] = value[t * value_s0 + g * value_s1 + d];
  }
}

template <typename T>
__global__ void __launch_bounds__(kAttnWarps * 32) paged_attention_kernel(const AttnArgs a) {
  __shared__ float warp_max[kAttnWarps];
  __shared__ float warp_sum_exp[kAttnWarps];
  __shared__ float warp_acc[kAttnWarps][kMaxDimsPerLane * 32];
  // This CTA's merged state, read by CTA 0 of the cluster: m, l, then acc[head_dim].
  __shared__ float cta_state[2 + kMaxDimsPerLane * 32];
  const Cluster cluster;
  const int splits = cluster.size();
  const int split = cluster.rank();
  const int64_t t = blockIdx.x / splits;
  const int h = blockIdx.y;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int head_dim = a.kv.head_dim;
  const int kv_head = h / (a.num_heads / a.kv.num_kv_heads);

  const KeyRange keys = key_range(a, t, split, splits);
  const int64_t seq = keys.seq, num_keys = keys.num_keys;
  const int64_t my_first = keys.my_first, my_last = keys.my_last;

  const T* q_src = static_cast<const T*>(a.query) + t * a.query_s0 + h * a.query_s1;
  float q[kMaxDimsPerLane];
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    q[i] = d < head_dim ? detail::to_f32(q_src[d]) * a.scale : 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  float acc[kMaxDimsPerLane];
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) acc[i] = 0.0f;

  const int32_t* pages = a.block_table + (seq >= 0 && seq < a.num_seqs ? seq : 0) * a.bt_s0;
  for (int64_t j = my_first + warp; j <= my_last; j += kAttnWarps) {
    const int64_t page = pages[(j / a.kv.block_tokens) * a.bt_s1];
    if (page < 0) continue;  // a hole in the block table: nothing cached there
    const int64_t in_page = j % a.kv.block_tokens;
    const T* k_row = kv_row<T>(a.kv, page, in_page, kv_head, false);
    const T* v_row = kv_row<T>(a.kv, page, in_page, kv_head, true);
    float dot = 0.0f;
    float v[kMaxDimsPerLane];
#pragma unroll
    for (int i = 0; i < kMaxDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      const bool in = d < head_dim;
      dot += in ? q[i] * detail::to_f32(k_row[d]) : 0.0f;
      v[i] = in ? detail::to_f32(v_row[d]) : 0.0f;
    }
    const float logit = detail::warp_sum(dot);
    const float m_new = fmaxf(m, logit);
    const float correction = __expf(m - m_new);
    const float p = __expf(logit - m_new);
    l = l * correction + p;
#pragma unroll
    for (int i = 0; i < kMaxDimsPerLane; ++i) acc[i] = acc[i] * correction + p * v[i];
    m = m_new;
  }

  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum_exp[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) warp_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();

  // The CTA's state: the warps' states rescaled to the CTA maximum.
  float cta_max = -INFINITY;
#pragma unroll
  for (int w = 0; w < kAttnWarps; ++w) cta_max = fmaxf(cta_max, warp_max[w]);
  float factor[kAttnWarps];
  float cta_sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kAttnWarps; ++w) {
    factor[w] = warp_max[w] == -INFINITY ? 0.0f : __expf(warp_max[w] - cta_max);
    cta_sum += warp_sum_exp[w] * factor[w];
  }
  if (threadIdx.x == 0) {
    cta_state[0] = cta_max;
    cta_state[1] = cta_sum;
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) sum += warp_acc[w][d] * factor[w];
    cta_state[2 + d] = sum;
  }
  cluster.sync();  // every CTA state is written (a CTA barrier without a cluster)

  if (split == 0) {  // merge the S states with the sink, in rank order
    const float sink = a.sinks != nullptr ? a.sinks[h * a.sinks_stride] : -INFINITY;
    float big = sink;
    for (int r = 0; r < splits; ++r) big = fmaxf(big, cluster.peer(cta_state, r)[0]);
    float denominator = a.sinks != nullptr ? __expf(sink - big) : 0.0f;
    for (int r = 0; r < splits; ++r) {
      const float* state = cluster.peer(cta_state, r);
      denominator += state[0] == -INFINITY ? 0.0f : state[1] * __expf(state[0] - big);
    }
    const float inv = num_keys > 0 && denominator > 0.0f ? 1.0f / denominator : 0.0f;
    T* o = static_cast<T*>(a.out) + t * a.out_s0 + h * a.out_s1;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
      float sum = 0.0f;
      for (int r = 0; r < splits; ++r) {
        const float* state = cluster.peer(cta_state, r);
        sum += state[0] == -INFINITY ? 0.0f : state[2 + d] * __expf(state[0] - big);
      }
      o[d] = detail::from_f32<T>(sum * inv);
    }
  }
  cluster.sync();  // CTA 0 has read every peer's state before any CTA exits
}

// Which kernel serves a call. auto (unset): the tensor-core GQA kernel (attention/mma.cu)
// where it qualifies, else the CUDA-core GQA kernel (attention/gqa.cu), else this file's
// per-head kernel: the order measured on the H200 (bench/NOTES.md, attention). mma, gqa or
// per_head start the chain there (tests and benchmarks force each). Read per call (~100 ns) so
// tests can switch.
enum class AttnKernel { kMma = 0, kGqa = 1, kPerHead = 2 };

AttnKernel first_attention_kernel() {
  const char* value = std::getenv("MOELORA_ATTN_KERNEL");
  const std::string name = value != nullptr ? value : "auto";
  if (name == "auto" || name == "mma" || name.empty()) return AttnKernel::kMma;
  if (name == "gqa") return AttnKernel::kGqa;
  if (name == "per_head") return AttnKernel::kPerHead;
  throw InvalidArgument("MOELORA_ATTN_KERNEL must be auto, mma, gqa or per_head, got '" + name +
                        "'");
}

KvLayout make_layout(const KvCacheView& cache) {
  KvLayout kv{};
  kv.arena = cache.arena;
  kv.page_bytes = cache.page_bytes;
  kv.block_tokens = cache.block_tokens;
  kv.num_kv_heads = cache.num_kv_heads;
  kv.head_dim = cache.head_dim;
  kv.half_page_elems = int64_t{cache.block_tokens} * cache.num_kv_heads * cache.head_dim;
  return kv;
}

}  // namespace

namespace {

// MOELORA_ATTN_SPLITS=<n in 1..8> forces the split-KV factor (tests reach it on short
// contexts); unset: the heuristic; not an integer in 1..8: InvalidArgument. Read once.
int forced_splits() {
  static const int forced = detail::env_int("MOELORA_ATTN_SPLITS", 1, kMaxSplits);
  return forced;
}

}  // namespace

// max_context is the block table's width in keys: the lengths themselves live on the device.
int attention_splits(int64_t ctas, int64_t max_context, int64_t resident_ctas) {
  if (detail::compute_capability_major() < 9) return 1;
  if (const int forced = forced_splits()) return forced;
  const int64_t wanted = resident_ctas > 0 ? resident_ctas / ctas  // at most one wave
                                           : (2 * int64_t{detail::sm_count()} + ctas - 1) / ctas;
  const int64_t by_keys = std::max<int64_t>(1, max_context / kMinKeysPerSplit);
  return static_cast<int>(std::clamp<int64_t>(std::min(wanted, by_keys), 1, kMaxSplits));
}


void kv_cache_write(const TensorRef& key, const TensorRef& value, const TensorRef& slot_mapping,
                    const KvCacheView& cache, void* stream) {
  const int64_t num_tokens = key.shape[0];
  if (num_tokens == 0) return;
  const KvLayout kv = make_layout(cache);
  const int64_t row_elems = int64_t{cache.num_kv_heads} * cache.head_dim;
  const int threads = static_cast<int>(detail::min64(256, (row_elems + 31) / 32 * 32));
  MOELORA_DISPATCH_FLOAT(cache.dtype, T, {
    kv_cache_write_kernel<T><<<static_cast<unsigned>(num_tokens), threads, 0,
                               detail::as_stream(stream)>>>(
        static_cast<const T*>(key.data), key.stride[0], key.stride[1],
        static_cast<const T*>(value.data), value.stride[0], value.stride[1],
        static_cast<const int64_t*>(slot_mapping.data), slot_mapping.stride[0], kv);
  });
  detail::check_launch("kv_cache_write");
}

void paged_attention(const TensorRef& out, const TensorRef& query, const TensorRef& query_seq,
                     const TensorRef& query_pos, const TensorRef& block_table,
                     const TensorRef& seq_lens, const KvCacheView& cache, float scale,
                     int32_t sliding_window, const TensorRef& sinks, void* stream) {
  if (cache.head_dim > kMaxDimsPerLane * 32) {
    throw InvalidArgument("paged_attention: the CUDA kernel supports head_dim <= " +
                          std::to_string(kMaxDimsPerLane * 32) + ", got " +
                          std::to_string(cache.head_dim));
  }
  const int64_t num_tokens = query.shape[0];
  if (num_tokens == 0) return;
  AttnArgs a{};
  a.out = out.data;
  a.out_s0 = out.stride[0];
  a.out_s1 = out.stride[1];
  a.query = query.data;
  a.query_s0 = query.stride[0];
  a.query_s1 = query.stride[1];
  a.query_seq = static_cast<const int32_t*>(query_seq.data);
  a.query_seq_stride = query_seq.stride[0];
  a.query_pos = static_cast<const int32_t*>(query_pos.data);
  a.query_pos_stride = query_pos.stride[0];
  a.block_table = static_cast<const int32_t*>(block_table.data);
  a.bt_s0 = block_table.stride[0];
  a.bt_s1 = block_table.stride[1];
  a.max_blocks_per_seq = block_table.shape[1];
  a.seq_lens = static_cast<const int32_t*>(seq_lens.data);
  a.seq_lens_stride = seq_lens.stride[0];
  a.num_seqs = seq_lens.shape[0];
  const bool has_sinks = !(sinks.data == nullptr && sinks.ndim == 0);
  a.sinks = has_sinks ? static_cast<const float*>(sinks.data) : nullptr;
  a.sinks_stride = has_sinks ? sinks.stride[0] : 0;
  a.scale = scale;
  a.sliding_window = sliding_window;
  a.num_heads = static_cast<int32_t>(query.shape[1]);
  a.kv = make_layout(cache);
  const AttnKernel first = first_attention_kernel();
  if (first == AttnKernel::kMma &&
      launch_paged_attention_mma(a, cache.dtype, num_tokens, detail::as_stream(stream))) {
    detail::check_launch("paged_attention mma");
    return;
  }
  if (first <= AttnKernel::kGqa &&
      launch_paged_attention_gqa(a, cache.dtype, num_tokens, detail::as_stream(stream))) {
    detail::check_launch("paged_attention gqa");
    return;
  }
  const int splits = attention_splits(num_tokens * a.num_heads,
                                      a.max_blocks_per_seq * int64_t{cache.block_tokens});
  const dim3 grid(static_cast<unsigned>(num_tokens * splits), static_cast<unsigned>(a.num_heads));
  MOELORA_DISPATCH_FLOAT(cache.dtype, T, {
    launch_in_clusters(paged_attention_kernel<T>, grid, dim3(kAttnWarps * 32), 0,
                       detail::as_stream(stream), splits, a);
  });
  detail::check_launch("paged_attention");
}

}  // namespace moelora::cuda
