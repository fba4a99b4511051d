// paged_attention, tensor-core GQA form (the default where it qualifies): a cluster of S CTAs
// (split-KV) per (query token, KV head) serves the `ratio` (<= 16) query heads that share the KV
// head with mma.sync m16n8k16, the query heads as the 16 rows of M.
//
// Why: the CUDA-core GQA kernel (attention/gqa.cu) spends ~2 * ratio fp32 FMAs per K/V
// element plus conversions and shuffles per key (at 8 query heads per KV head that is about the
// H200's fp32 rate at HBM speed), keeps ~16 KB per CTA in flight and waits for each block-table
// read before the K/V loads behind it. Here:
//   - keys come in tiles of 64 (16 per warp) through a 3-stage cp.async pipeline: the K and V
//     rows of the KV head, 16-byte chunks XOR-swizzled by (row & 7) so ldmatrix is free of bank
//     conflicts; keys past the split's range or in block-table holes are zero-filled and
//     flagged invalid;
//   - the block-table entries of a tile are read one pipeline step before its copies are issued,
//     so the lookup's latency hides behind a tile of compute;
//   - per tile a warp computes S = Q K^T for its 16 keys (Q fragments live in registers; rows
//     >= ratio are zero), the online softmax in the log2 domain (row max over a quad of lanes,
//     one rescale per tile), then O += P V with P re-packed from the S accumulators as the A
//     operand (FlashAttention-2's register hand-over); P is rounded to T for that mma, the
//     denominator sums it in fp32;
//   - the 4 warps' states, then the S CTAs', merge through attention/attention.cuh (CTA 0, fixed
//     order, sinks added once).
// Template space: T in {half, bf16} x D in {64, 128}. Shared memory: 3 stages of 64 keys x
// (K + V) rows, 48 KB (D = 64) / 96 KB (D = 128), reused for the warps' states at the end, plus
// the CTA's merged state (8 KB at D = 128) read by CTA 0 of the cluster.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention/attention.cuh"
#include "common/cluster.cuh"
#include "common/common.cuh"
#include "common/kernel_modules.cuh"
#include "common/ptx.cuh"
#include "plan_rules.h"

namespace moelora::cuda {

namespace {

using namespace ptx;  // NOLINT: the PTX wrappers read best unqualified here

constexpr int kThreads = kAttnWarps * 32;
constexpr int kWarpKeys = 32;                       // keys of a tile one warp computes on
constexpr int kTileKeys = kWarpKeys * kAttnWarps;   // keys per pipeline step: one per thread
constexpr int kStages = 3;
constexpr int kOffsetSlots = 4;  // key-offset ring: tiles it .. it + 3 live at step it
constexpr int kRows = 16;        // M: the query heads of one KV head, zero-padded
static_assert(kTileKeys == kThreads, "each thread resolves one key of a tile");

template <int D>
struct TileShape {
  static constexpr int kRowBytes = D * 2;
  static constexpr int kVecs = D / 8;                       // 16-byte chunks of a row
  static constexpr int kKeysPerPass = kThreads / kVecs;     // rows one copy pass covers
  static constexpr int kPasses = kTileKeys / kKeysPerPass;  // copy passes per tile (K and V)
  static constexpr int kTileBytes = kTileKeys * kRowBytes;  // K (or V) of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kAttnWarps * kRows * (2 + D) * 4 <= kSmemBytes, "warp states reuse the stages");
};

// Byte offset of 16-byte chunk `ch` of row `row` in a tile of D-element rows.
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int ch) {
  return static_cast<uint32_t>(row * TileShape<D>::kRowBytes + ((ch ^ (row & 7)) << 4));
}

// Elements col and col + 1 of query head row r as a packed pair (zero for r >= ratio).
template <typename T>
__device__ __forceinline__ uint32_t query_pair(const T* q, int r, int ratio, int64_t head_stride,
                                               int col) {
  if (r >= ratio) return 0u;
  uint16_t lo, hi;
  memcpy(&lo, q + r * head_stride + col, 2);
  memcpy(&hi, q + r * head_stride + col + 1, 2);
  return lo | (static_cast<uint32_t>(hi) << 16);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) paged_attention_mma_kernel(const AttnArgs a) {
  using Shape = TileShape<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float cta_state[kRows][2 + D];  // read by CTA 0 of the cluster
  // Byte offset in the arena of each key's K row for this KV head (V: + half a page); -1 for
  // keys past the split's range or in block-table holes (copied as zeros, masked).
  __shared__ int64_t key_offset[kOffsetSlots][kTileKeys];
  const Cluster cluster;
  const int64_t t = blockIdx.x / cluster.size();
  const int kv_head = blockIdx.y;
  const int ratio = a.num_heads / a.kv.num_kv_heads;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const KeyRange keys = key_range(a, t, cluster.rank(), cluster.size());
  const int my_keys = static_cast<int>(detail::max64(0, keys.my_last - keys.my_first + 1));
  const int num_tiles = (my_keys + kTileKeys - 1) / kTileKeys;

  // Q as A fragments: rows lane/4 and lane/4 + 8, columns (lane%4)*2 (+1, +8, +9) of each k16.
  uint32_t qa[D / 16][4];
  {
    const T* q = static_cast<const T*>(a.query) + t * a.query_s0 +
                 int64_t{kv_head} * ratio * a.query_s1;
    const int r0 = lane >> 2, col = (lane & 3) * 2;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      qa[ks][0] = query_pair(q, r0, ratio, a.query_s1, 16 * ks + col);
      qa[ks][1] = query_pair(q, r0 + 8, ratio, a.query_s1, 16 * ks + col);
      qa[ks][2] = query_pair(q, r0, ratio, a.query_s1, 16 * ks + col + 8);
      qa[ks][3] = query_pair(q, r0 + 8, ratio, a.query_s1, 16 * ks + col + 8);
    }
  }

  // Key resolution, one key of a tile per thread: the block-table entry is loaded early
  // (page_of) and its offset stored late (store_offset), so the load's latency overlaps a
  // tile of compute.
  const int32_t* pages = a.block_table + (keys.seq >= 0 ? keys.seq : 0) * a.bt_s0;
  const int first = static_cast<int>(keys.my_first);
  const int last = static_cast<int>(keys.my_last);
  const int64_t head_bytes = int64_t{kv_head} * D * 2;
  const int64_t token_bytes = int64_t{a.kv.num_kv_heads} * D * 2;
  auto page_of = [&](int tile, int& in_page) -> int {
    const int j = first + tile * kTileKeys + static_cast<int>(threadIdx.x);
    if (j > last) return -1;
    const int block = j / a.kv.block_tokens;
    in_page = j - block * a.kv.block_tokens;
    return pages[block * a.bt_s1];
  };
  auto store_offset = [&](int tile, int page, int in_page) {
    key_offset[tile % kOffsetSlots][threadIdx.x] =
        page >= 0 ? page * a.kv.page_bytes + in_page * token_bytes + head_bytes : -1;
  };
  const int64_t value_bytes = a.kv.half_page_elems * 2;
  // Copies: thread i moves chunk i % kVecs of rows i / kVecs + p * kKeysPerPass of a tile.
  const int copy_row = threadIdx.x / Shape::kVecs;
  const int copy_vec = threadIdx.x % Shape::kVecs;
  auto issue = [&](int tile, int stage) {
    const uint32_t k_base = smem_u32(smem + stage * Shape::kStageBytes);
    const int64_t* offsets = key_offset[tile % kOffsetSlots];
#pragma unroll
    for (int p = 0; p < Shape::kPasses; ++p) {
      const int row = copy_row + p * Shape::kKeysPerPass;
      const int64_t offset = offsets[row];
      const bool ok = offset >= 0;
      const std::byte* k_src = a.kv.arena + (ok ? offset + copy_vec * 16 : 0);
      cp_async16(k_base + swz<D>(row, copy_vec), k_src, ok);
      cp_async16(k_base + Shape::kTileBytes + swz<D>(row, copy_vec),
                 ok ? k_src + value_bytes : k_src, ok);
    }
  };

  float o[D / 8][4];  // O rows lane/4 (0, 1) and lane/4 + 8 (2, 3) of the m16n8 tiles
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // row max (log2 domain), quad-uniform
  float l[2] = {0.0f, 0.0f};            // this lane's share of the row sums
  const float scale_log2 = a.scale * kLog2e;

  auto compute = [&](int tile, int stage) {
    const uint32_t k_base = smem_u32(smem + stage * Shape::kStageBytes);
    const uint32_t v_base = k_base + Shape::kTileBytes;
    const int64_t* offsets = key_offset[tile % kOffsetSlots];
    const int key0 = warp * kWarpKeys;
    // S = Q K^T over the warp's 32 keys: 4 m16n8 tiles, two ldmatrix.x4 of K per k16 step
    // (matrices: keys 0-7 | 8-15 of each 16 x (k lo | hi)).
    float s[4][4];
#pragma unroll
    for (int n = 0; n < 4; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint32_t b[4];
        ldsm_x4(b, k_base + swz<D>(key0 + 16 * half + (lane & 7) + ((lane >> 4) << 3),
                                   2 * ks + ((lane >> 3) & 1)));
        mma16816<T>(s[2 * half], qa[ks], b[0], b[1]);
        mma16816<T>(s[2 * half + 1], qa[ks], b[2], b[3]);
      }
    }
    // Online softmax, log2 domain; rows lane/4 (h = 0: elements 0, 1) and lane/4 + 8 (h = 1).
    bool valid[4][2];
#pragma unroll
    for (int n = 0; n < 4; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) valid[n][e] = offsets[key0 + 8 * n + (lane & 3) * 2 + e] >= 0;
    }
    float correction[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[n][2 * h + e] = valid[n][e] ? s[n][2 * h + e] * scale_log2 : -INFINITY;
          mx = fmaxf(mx, s[n][2 * h + e]);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[h], mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // no key yet: everything is 0
      correction[h] = exp2f(m[h] - base);
      m[h] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[n][2 * h + e] = exp2f(s[n][2 * h + e] - base);  // now p
          sum += s[n][2 * h + e];
        }
      }
      l[h] = l[h] * correction[h] + sum;
    }
    // Once the running max settles (long contexts) the rescale is a no-op: skip it warp-wide.
    if (__any_sync(0xffffffffu, correction[0] != 1.0f || correction[1] != 1.0f)) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= correction[0];
        o[n][1] *= correction[0];
        o[n][2] *= correction[1];
        o[n][3] *= correction[1];
      }
    }
    // P's m16n8 accumulators of keys 16k..16k+7 and +8..+15 are the A fragment of k16 step k.
    uint32_t pa[2][4];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      pa[k][0] = pack2<T>(s[2 * k][0], s[2 * k][1]);
      pa[k][1] = pack2<T>(s[2 * k][2], s[2 * k][3]);
      pa[k][2] = pack2<T>(s[2 * k + 1][0], s[2 * k + 1][1]);
      pa[k][3] = pack2<T>(s[2 * k + 1][2], s[2 * k + 1][3]);
    }
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {  // B = V: matrices (keys 0-7 | 8-15) x (dims 16c | +8)
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        uint32_t b[4];
        ldsm_x4_trans(b, v_base + swz<D>(key0 + 16 * k + (lane & 7) + (((lane >> 3) & 1) << 3),
                                         2 * c + (lane >> 4)));
        mma16816<T>(o[2 * c], pa[k], b[0], b[1]);
        mma16816<T>(o[2 * c + 1], pa[k], b[2], b[3]);
      }
    }
  };

  // The pipeline: at step it, tile it + 2 is issued, tile it computed, and the keys of tile
  // it + 3 resolved (offsets stored after the compute, read after the next barrier).
  {
    int in_page[kStages] = {};
    int page[kStages];
#pragma unroll
    for (int s = 0; s < kStages; ++s) page[s] = page_of(s, in_page[s]);
#pragma unroll
    for (int s = 0; s < kStages; ++s) store_offset(s, page[s], in_page[s]);
  }
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) issue(s, s);
    cp_async_commit();
  }
  for (int it = 0; it < num_tiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile it landed; stage (it - 1) % kStages and its offsets are free
    const int next = it + kStages - 1;
    if (next < num_tiles) issue(next, next % kStages);
    cp_async_commit();
    int in_page = 0;
    const int page = next + 1 < num_tiles ? page_of(next + 1, in_page) : -1;
    compute(it, it % kStages);
    if (next + 1 < num_tiles) store_offset(next + 1, page, in_page);
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages are free for the warps' states

  float* warp_states = reinterpret_cast<float*>(smem);  // [warps][kRows][2 + D]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float row_sum = l[h];
    row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
    row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 2);
    float* state = warp_states + (warp * kRows + (lane >> 2) + 8 * h) * (2 + D);
    if ((lane & 3) == 0) {
      state[0] = m[h];
      state[1] = row_sum;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      state[2 + 8 * n + (lane & 3) * 2] = o[n][2 * h];
      state[2 + 8 * n + (lane & 3) * 2 + 1] = o[n][2 * h + 1];
    }
  }
  __syncthreads();
  merge_warp_states(warp_states, kAttnWarps, kRows, &cta_state[0][0], ratio, D);
  store_cluster_states<T>(cluster, &cta_state[0][0], a, t, kv_head, ratio, keys.num_keys > 0);
}

// CTAs of this instantiation one SM holds (shared memory bounds it: 1 at D = 128, 2 at 64).
template <typename T, int D>
int ctas_per_sm() {
  static const int count = [] {
    int n = 0;
    MOELORA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, paged_attention_mma_kernel<T, D>, kThreads, TileShape<D>::kSmemBytes));
    return std::max(n, 1);
  }();
  return count;
}

template <typename T, int D>
void launch(const AttnArgs& a, int64_t num_tokens, const AttentionPlan& plan,
            cudaStream_t stream) {
  const auto kernel = paged_attention_mma_kernel<T, D>;
  // Over the default 48 KB of dynamic shared memory at D = 128; cheap, legal during capture.
  detail::allow_dynamic_smem(kernel, TileShape<D>::kSmemBytes);
  // At most one wave of resident CTAs: with one CTA per SM at D = 128, a second wave doubles
  // the latency (docs/performance.md, "Split-KV").
  const int64_t ctas = num_tokens * a.kv.num_kv_heads;
  const DeviceProps device = device_props(DeviceKind::kCUDA, -1);
  const int splits = plan_rules::attention_splits(
      ctas, a.max_blocks_per_seq * int64_t{a.kv.block_tokens},
      int64_t{ctas_per_sm<T, D>()} * device.sm_count, plan, device);
  const dim3 grid(static_cast<unsigned>(num_tokens * splits),
                  static_cast<unsigned>(a.kv.num_kv_heads));
  launch_in_clusters(kernel, grid, dim3(kThreads), TileShape<D>::kSmemBytes, stream, splits, a);
}

template <typename T>
void launch_for_head_dim(const AttnArgs& a, int64_t num_tokens, const AttentionPlan& plan,
                         cudaStream_t stream) {
  if (a.kv.head_dim == 64) {
    launch<T, 64>(a, num_tokens, plan, stream);
  } else {
    launch<T, 128>(a, num_tokens, plan, stream);
  }
}

}  // namespace

void launch_paged_attention_mma(const AttnArgs& a, DType dtype, int64_t num_tokens,
                                const AttentionPlan& plan, cudaStream_t stream) {
  if (dtype == DType::kFloat16) {
    launch_for_head_dim<__half>(a, num_tokens, plan, stream);
  } else {
    launch_for_head_dim<__nv_bfloat16>(a, num_tokens, plan, stream);
  }
}

}  // namespace moelora::cuda

MOELORA_KERNEL_MODULE()
