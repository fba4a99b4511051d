// Rotary embeddings, with Qwen3's per-head q/k RMSNorm, fused with the paged KV-cache write
// (moelora/layer.h: rope_qk, rope_kv_write). For token t at position p, pair i < D/2:
//   c, s = cos, sin(float(p) * inv_freq[i]) * attention_scaling
//   x[i], x[i + D/2] = x[i] * c - x[i + D/2] * s, x[i + D/2] * c + x[i] * s   (rotate-half)
// with each product and the sum rounded to float32 (__fmul_rn / __fadd_rn: no FMA contraction,
// so float32 runs match torch's formula and the CPU reference), then to the activation dtype.
// Grid: (token, group of kRopeWarps heads). The CTA computes its token's D/2 cos/sin pairs once
// into shared memory; each warp then owns one head of the token's [query heads | key heads |
// value heads]: lanes hold pairs (i, i + D/2) for i = lane + 32 j (up to 4 pairs a lane, D <= 256),
// reduce the head's sum of squares by shuffles when a norm is given, rotate, and store in place;
// a key head is also stored into its cache page, a value head only copied there. A slot < 0
// skips the cache writes, never the rotation.
// Memory-bound and tiny: at decode one CTA row per sequence, (Hq + 2 Hkv) * D elements each.
#include <string>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "kernels/layer_dispatch.h"

namespace moelora::cuda {

namespace {

constexpr int kRopeWarps = 8;  // heads per CTA
constexpr int kMaxPairsPerLane = kRopeMaxHeadDim / 2 / 32;
static_assert(kRopeMaxHeadDim % 64 == 0, "whole pairs per lane");

struct RopeArgs {
  void* query;  // [T, Hq, D] strides q_s0, q_s1
  int64_t q_s0, q_s1;
  void* key;  // [T, Hkv, D]
  int64_t k_s0, k_s1;
  const void* value;  // [T, Hkv, D], null without a cache
  int64_t v_s0, v_s1;
  const int64_t* positions;  // [T]
  int64_t positions_stride;
  const float* inv_freq;  // [D/2]
  float attention_scaling;
  const void* q_norm;  // [D] or null (then k_norm is null too)
  const void* k_norm;
  float norm_eps;
  const int64_t* slot_mapping;  // [T], null without a cache
  int64_t slot_stride;
  std::byte* arena;  // page p at arena + p * page_bytes: K [block_tokens][Hkv][D], then V
  int64_t page_bytes;
  int64_t half_page_elems;
  int32_t block_tokens;
  int32_t num_heads, num_kv_heads, head_dim;
};

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return detail::to_f32(detail::from_f32<T>(v));
}

// One head at `row`: optional per-head norm, rotation, stored back (and to `copy` if set).
// Called by a whole warp (the norm's shuffle reduction).
template <typename T>
__device__ __forceinline__ void rotate_head(T* row, T* copy, const T* norm, float eps,
                                            int head_dim, const float* cos_s, const float* sin_s,
                                            int lane) {
  const int half = head_dim / 2;
  float lo[kMaxPairsPerLane], hi[kMaxPairsPerLane];
#pragma unroll
  for (int j = 0; j < kMaxPairsPerLane; ++j) {
    const int i = lane + 32 * j;
    lo[j] = i < half ? detail::to_f32(row[i]) : 0.0f;
    hi[j] = i < half ? detail::to_f32(row[i + half]) : 0.0f;
  }
  if (norm != nullptr) {
    float sum_sq = 0.0f;
#pragma unroll
    for (int j = 0; j < kMaxPairsPerLane; ++j) sum_sq += lo[j] * lo[j] + hi[j] * hi[j];
    sum_sq = detail::warp_sum(sum_sq);
    const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(head_dim) + eps);
#pragma unroll
    for (int j = 0; j < kMaxPairsPerLane; ++j) {
      const int i = lane + 32 * j;
      if (i < half) {
        lo[j] = round_to<T>(detail::to_f32(norm[i]) * round_to<T>(lo[j] * inv));
        hi[j] = round_to<T>(detail::to_f32(norm[i + half]) * round_to<T>(hi[j] * inv));
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxPairsPerLane; ++j) {
    const int i = lane + 32 * j;
    if (i < half) {
      const float c = cos_s[i], s = sin_s[i];
      const T out_lo = detail::from_f32<T>(__fsub_rn(__fmul_rn(lo[j], c), __fmul_rn(hi[j], s)));
      const T out_hi = detail::from_f32<T>(__fadd_rn(__fmul_rn(hi[j], c), __fmul_rn(lo[j], s)));
      row[i] = out_lo;
      row[i + half] = out_hi;
      if (copy != nullptr) {
        copy[i] = out_lo;
        copy[i + half] = out_hi;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kRopeWarps * 32) rope_kv_kernel(const RopeArgs a) {
  __shared__ float cos_s[kRopeMaxHeadDim / 2];
  __shared__ float sin_s[kRopeMaxHeadDim / 2];
  const int64_t t = blockIdx.x;
  const int half = a.head_dim / 2;
  const float position = static_cast<float>(a.positions[t * a.positions_stride]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float s, c;
    sincosf(position * a.inv_freq[i], &s, &c);  // full-range accurate (no fast math)
    cos_s[i] = c * a.attention_scaling;
    sin_s[i] = s * a.attention_scaling;
  }
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int head = blockIdx.y * kRopeWarps + threadIdx.x / 32;
  const int64_t slot = a.slot_mapping != nullptr ? a.slot_mapping[t * a.slot_stride] : -1;
  // This token's K rows in its cache page (V rows follow half_page_elems later), or null.
  T* cache_k = nullptr;
  if (slot >= 0) {
    const int64_t page = slot / a.block_tokens, in_page = slot % a.block_tokens;
    cache_k = reinterpret_cast<T*>(a.arena + page * a.page_bytes) +
              in_page * a.num_kv_heads * int64_t{a.head_dim};
  }
  if (head < a.num_heads) {
    T* row = static_cast<T*>(a.query) + t * a.q_s0 + head * a.q_s1;
    rotate_head(row, static_cast<T*>(nullptr), static_cast<const T*>(a.q_norm), a.norm_eps,
                a.head_dim, cos_s, sin_s, lane);
  } else if (head < a.num_heads + a.num_kv_heads) {
    const int g = head - a.num_heads;
    T* row = static_cast<T*>(a.key) + t * a.k_s0 + g * a.k_s1;
    T* copy = cache_k != nullptr ? cache_k + int64_t{g} * a.head_dim : nullptr;
    rotate_head(row, copy, static_cast<const T*>(a.k_norm), a.norm_eps, a.head_dim, cos_s, sin_s,
                lane);
  } else if (cache_k != nullptr && head < a.num_heads + 2 * a.num_kv_heads) {
    const int g = head - a.num_heads - a.num_kv_heads;
    const T* src = static_cast<const T*>(a.value) + t * a.v_s0 + g * a.v_s1;
    T* dst = cache_k + a.half_page_elems + int64_t{g} * a.head_dim;
    for (int d = lane; d < a.head_dim; d += 32) dst[d] = src[d];
  }
}

}  // namespace

void rope_kv_write(const TensorRef& query, const TensorRef& key, const TensorRef& value,
                   const TensorRef& positions, const TensorRef& inv_freq, float attention_scaling,
                   const TensorRef& q_norm, const TensorRef& k_norm, float norm_eps,
                   const TensorRef& slot_mapping, const KvCacheView* cache, void* stream) {
  const char* op = cache != nullptr ? "rope_kv_write" : "rope_qk";
  const int64_t tokens = query.shape[0];
  if (tokens == 0) return;
  RopeArgs a{};
  a.query = query.data;
  a.q_s0 = query.stride[0];
  a.q_s1 = query.stride[1];
  a.key = key.data;
  a.k_s0 = key.stride[0];
  a.k_s1 = key.stride[1];
  a.positions = static_cast<const int64_t*>(positions.data);
  a.positions_stride = positions.stride[0];
  a.inv_freq = static_cast<const float*>(inv_freq.data);
  a.attention_scaling = attention_scaling;
  a.q_norm = q_norm.data;
  a.k_norm = k_norm.data;
  a.norm_eps = norm_eps;
  a.num_heads = static_cast<int32_t>(query.shape[1]);
  a.num_kv_heads = static_cast<int32_t>(key.shape[1]);
  a.head_dim = static_cast<int32_t>(query.shape[2]);
  int64_t heads = query.shape[1] + key.shape[1];
  if (cache != nullptr) {
    a.value = value.data;
    a.v_s0 = value.stride[0];
    a.v_s1 = value.stride[1];
    a.slot_mapping = static_cast<const int64_t*>(slot_mapping.data);
    a.slot_stride = slot_mapping.stride[0];
    a.arena = cache->arena;
    a.page_bytes = cache->page_bytes;
    a.block_tokens = cache->block_tokens;
    a.half_page_elems = int64_t{cache->block_tokens} * cache->num_kv_heads * cache->head_dim;
    heads += key.shape[1];
  }
  const int64_t head_groups = (heads + kRopeWarps - 1) / kRopeWarps;
  if (tokens > 0x7fffffffLL || head_groups > 65535) {
    throw InvalidArgument(std::string(op) + ": the CUDA kernel takes at most 2^31 - 1 tokens "
                                            "and 524280 heads, got " +
                          std::to_string(tokens) + " tokens and " + std::to_string(heads) +
                          " heads");
  }
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(head_groups));
  MOELORA_DISPATCH_FLOAT(query.dtype, T, {
    rope_kv_kernel<T><<<grid, kRopeWarps * 32, 0, detail::as_stream(stream)>>>(a);
  });
  detail::check_launch(op);
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
