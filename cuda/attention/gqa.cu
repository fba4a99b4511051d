// paged_attention, CUDA-core GQA form: a cluster of S CTAs (split-KV) per (query token, KV
// head), serving all `ratio` query heads that share the KV head. Second in the chain: it serves
// what the tensor-core kernel (attention/mma.cu, 2-6x faster on the H200) does not take, e.g.
// head_dim 256.
//
// Why: the per-head kernel (attention/per_head.cu) reads each KV head once per query head (4-8x
// the bytes with GQA, from L2 at best) and a warp walks one key at a time with 2-byte loads per
// lane (1-9% of the HBM roofline on the H200). Here a K or V row is read once for all its
// query heads, with 16-byte loads:
//   - a row of head_dim elements is LANES 16-byte vectors (LANES in {8, 16, 32}); a warp holds
//     32 / LANES keys at a time, lane l covering vector l % LANES of key l / LANES;
//   - each step a warp issues the block-table reads and then the K and V loads of kUnroll key
//     groups before using any, so ~kUnroll * 32 bytes a lane are in flight;
//   - per query head r the lane keeps q's slice (scaled), an online softmax (m, l) and its slice
//     of the V accumulator; logits are summed over the LANES lanes of a key with shuffles;
//   - states merge across the key groups of a warp (shuffles), the 4 warps (shared memory) and
//     the S CTAs of the cluster (DSMEM, CTA 0, fixed order), with the sink logit of each query
//     head added to its denominator once. A query that sees no key writes zeros.
// Template space: T in {half, bf16} x LANES in {8, 16, 32} x MAXR (query heads per KV head, a
// bound) in {1, 4, 8}.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "attention/attention.cuh"
#include "common/cluster.cuh"
#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "plan_rules.h"

namespace moelora::cuda {

namespace {

constexpr int kUnroll = 4;  // key groups a warp loads before computing on any

template <typename T>
constexpr int kElems = 16 / static_cast<int>(sizeof(T));  // elements of a 16-byte vector

template <typename T>
__device__ __forceinline__ void to_floats(const uint4& raw, float (&dst)[kElems<T>]) {
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kElems<T>; ++i) dst[i] = detail::to_f32(elems[i]);
}

// Online-softmax state of one query head on one lane: running max, sum, V slice accumulator.
template <typename T>
struct HeadState {
  float m, l;
  float acc[kElems<T>];
};

// Folds state (m2, l2, acc2) into s.
template <typename T>
__device__ __forceinline__ void fold(HeadState<T>& s, float m2, float l2,
                                     const float (&acc2)[kElems<T>]) {
  const float m = fmaxf(s.m, m2);
  const float f1 = s.m == -INFINITY ? 0.0f : __expf(s.m - m);
  const float f2 = m2 == -INFINITY ? 0.0f : __expf(m2 - m);
  s.l = s.l * f1 + l2 * f2;
#pragma unroll
  for (int i = 0; i < kElems<T>; ++i) s.acc[i] = s.acc[i] * f1 + acc2[i] * f2;
  s.m = m;
}

template <typename T, int LANES, int MAXR>
__global__ void __launch_bounds__(kAttnWarps * 32) paged_attention_gqa_kernel(const AttnArgs a) {
  constexpr int E = kElems<T>;
  constexpr int kKeysPerWarp = 32 / LANES;
  constexpr int D = LANES * E;  // head_dim
  // Per warp and query head: m, l, and the V accumulator (written by the lanes of key group 0).
  __shared__ float warp_state[kAttnWarps][MAXR][2 + D];
  // The CTA's merged state per query head, read by CTA 0 of the cluster.
  __shared__ float cta_state[MAXR][2 + D];
  const Cluster cluster;
  const int splits = cluster.size();
  const int split = cluster.rank();
  const int64_t t = blockIdx.x / splits;
  const int kv_head = blockIdx.y;
  const int ratio = a.num_heads / a.kv.num_kv_heads;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int vec = lane % LANES;     // this lane's 16-byte vector of a row
  const int group = lane / LANES;   // this lane's key within the warp's step
  const KeyRange keys = key_range(a, t, split, splits);

  float q[MAXR][E];
  HeadState<T> st[MAXR];
#pragma unroll
  for (int r = 0; r < MAXR; ++r) {
    const int h = kv_head * ratio + min(r, ratio - 1);  // heads past ratio: computed, not kept
    const T* q_src = static_cast<const T*>(a.query) + t * a.query_s0 + h * a.query_s1 + vec * E;
#pragma unroll
    for (int i = 0; i < E; ++i) q[r][i] = detail::to_f32(q_src[i]) * a.scale;
    st[r].m = -INFINITY;
    st[r].l = 0.0f;
#pragma unroll
    for (int i = 0; i < E; ++i) st[r].acc[i] = 0.0f;
  }

  const int32_t* pages = a.block_table + (keys.seq >= 0 ? keys.seq : 0) * a.bt_s0;
  constexpr int kStride = kAttnWarps * kKeysPerWarp;  // keys between a warp's consecutive groups
  for (int64_t base = keys.my_first + warp * kKeysPerWarp; base <= keys.my_last;
       base += int64_t{kStride} * kUnroll) {
    uint4 k_raw[kUnroll], v_raw[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + int64_t{u} * kStride + group;
      ok[u] = j <= keys.my_last;
      const int64_t page = ok[u] ? pages[(j / a.kv.block_tokens) * a.bt_s1] : -1;
      ok[u] = page >= 0;  // past the range, or a hole in the block table
      if (ok[u]) {
        const int64_t in_page = j % a.kv.block_tokens;
        k_raw[u] = *reinterpret_cast<const uint4*>(kv_row<T>(a.kv, page, in_page, kv_head, false) +
                                                   vec * E);
        v_raw[u] = *reinterpret_cast<const uint4*>(kv_row<T>(a.kv, page, in_page, kv_head, true) +
                                                   vec * E);
      } else {
        k_raw[u] = v_raw[u] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[E], vf[E];
      to_floats<T>(k_raw[u], kf);
      to_floats<T>(v_raw[u], vf);
#pragma unroll
      for (int r = 0; r < MAXR; ++r) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < E; ++i) dot = fmaf(q[r][i], kf[i], dot);
#pragma unroll
        for (int off = LANES / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (ok[u]) {  // uniform over the key's lanes
          const float m = fmaxf(st[r].m, dot);
          const float correction = __expf(st[r].m - m);
          const float p = __expf(dot - m);
          st[r].l = st[r].l * correction + p;
#pragma unroll
          for (int i = 0; i < E; ++i) st[r].acc[i] = st[r].acc[i] * correction + p * vf[i];
          st[r].m = m;
        }
      }
    }
  }

  // The warp's key groups into group 0 (same vec, other groups: lane xor multiples of LANES).
#pragma unroll
  for (int off = LANES; off < 32; off <<= 1) {
#pragma unroll
    for (int r = 0; r < MAXR; ++r) {
      const float m2 = __shfl_xor_sync(0xffffffffu, st[r].m, off);
      const float l2 = __shfl_xor_sync(0xffffffffu, st[r].l, off);
      float acc2[E];
#pragma unroll
      for (int i = 0; i < E; ++i) acc2[i] = __shfl_xor_sync(0xffffffffu, st[r].acc[i], off);
      fold<T>(st[r], m2, l2, acc2);
    }
  }
  if (group == 0) {  // into the shared merge's log2 domain
#pragma unroll
    for (int r = 0; r < MAXR; ++r) {
      if (vec == 0) {
        warp_state[warp][r][0] = st[r].m * kLog2e;
        warp_state[warp][r][1] = st[r].l;
      }
#pragma unroll
      for (int i = 0; i < E; ++i) warp_state[warp][r][2 + vec * E + i] = st[r].acc[i];
    }
  }
  __syncthreads();
  merge_warp_states(&warp_state[0][0][0], kAttnWarps, MAXR, &cta_state[0][0], ratio, D);
  store_cluster_states<T>(cluster, &cta_state[0][0], a, t, kv_head, ratio, keys.num_keys > 0);
}

template <typename T, int LANES>
void launch_for_ratio(const AttnArgs& a, int ratio, dim3 grid, int splits, cudaStream_t stream) {
  const dim3 block(kAttnWarps * 32);
  if (ratio == 1) {
    launch_in_clusters(paged_attention_gqa_kernel<T, LANES, 1>, grid, block, 0, stream, splits, a);
  } else if (ratio <= 4) {
    launch_in_clusters(paged_attention_gqa_kernel<T, LANES, 4>, grid, block, 0, stream, splits, a);
  } else {
    launch_in_clusters(paged_attention_gqa_kernel<T, LANES, 8>, grid, block, 0, stream, splits, a);
  }
}

template <typename T>
void launch_for_lanes(const AttnArgs& a, int lanes, int ratio, dim3 grid, int splits,
                      cudaStream_t stream) {
  if (lanes == 8) launch_for_ratio<T, 8>(a, ratio, grid, splits, stream);
  else if (lanes == 16) launch_for_ratio<T, 16>(a, ratio, grid, splits, stream);
  else launch_for_ratio<T, 32>(a, ratio, grid, splits, stream);
}

}  // namespace

void launch_paged_attention_gqa(const AttnArgs& a, DType dtype, int64_t num_tokens,
                                const AttentionPlan& plan, cudaStream_t stream) {
  const int lanes = a.kv.head_dim * 2 / 16;  // 16-byte vectors of a row: 8, 16 or 32
  const int ratio = a.num_heads / a.kv.num_kv_heads;
  const int splits = plan_rules::attention_splits(
      num_tokens * a.kv.num_kv_heads, a.max_blocks_per_seq * int64_t{a.kv.block_tokens},
      /*resident_ctas=*/0, plan, device_props(DeviceKind::kCUDA, -1));
  const dim3 grid(static_cast<unsigned>(num_tokens * splits),
                  static_cast<unsigned>(a.kv.num_kv_heads));
  if (dtype == DType::kFloat16) {
    launch_for_lanes<__half>(a, lanes, ratio, grid, splits, stream);
  } else {
    launch_for_lanes<__nv_bfloat16>(a, lanes, ratio, grid, splits, stream);
  }
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
