// paged_attention, the per-head form: a cluster of S CTAs (split-KV, S <= 8) of 4 warps per
// (query token, query head). The last kernel of the chain (attention/dispatch.cu): it serves
// every layout (float32, head_dim up to 256, any GQA ratio) that the GQA kernels do not.
//   The keys of the token's window [max(0, pos - window + 1), min(pos, seq_len - 1)] are cut in
//   S contiguous ranges, one per CTA, and dealt round-robin to its warps; a warp computes
//   <q, K_j> with lanes over head_dim (q held in registers, up to 8 elements a lane, so
//   head_dim <= 256) and keeps an online softmax (running max m, sum l, fp32 accumulator of V).
//   The 4 warp states merge in shared memory into the CTA's; CTA 0 of the cluster merges the S
//   CTA states through distributed shared memory (fixed order: repeated runs are identical) with
//   the sink logit (GPT-OSS) added to the denominator only. GQA: kv head = head / (num_heads /
//   num_kv_heads). A query that sees no key writes zeros (the CPU reference's rule).
//   It reads each KV head once per query head, one key per warp at a time: a few percent of the
//   HBM roofline, hence last in the chain (docs/performance.md, "Attention kernels").
#include <cmath>
#include <string>

#include "attention/attention.cuh"
#include "common/cluster.cuh"
#include "common/common.cuh"
#include "common/kernel_modules.cuh"

namespace moelora::cuda {

namespace {

constexpr int kMaxDimsPerLane = 8;  // head_dim <= 256

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

}  // namespace

void launch_paged_attention_per_head(const AttnArgs& a, DType dtype, int64_t num_tokens,
                                     int splits, cudaStream_t stream) {
  if (a.kv.head_dim > kMaxDimsPerLane * 32) {
    throw InvalidArgument("paged_attention: the CUDA kernel supports head_dim <= " +
                          std::to_string(kMaxDimsPerLane * 32) + ", got " +
                          std::to_string(a.kv.head_dim));
  }
  const dim3 grid(static_cast<unsigned>(num_tokens * splits), static_cast<unsigned>(a.num_heads));
  MOELORA_DISPATCH_FLOAT(dtype, T, {
    launch_in_clusters(paged_attention_kernel<T>, grid, dim3(kAttnWarps * 32), 0, stream, splits,
                       a);
  });
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
