// The persistent expert GEMM of moe_expert_gemm (MoeGemmKernel::kStream), built for decode: a
// few pair rows per expert, so its time is the touched experts' weight bytes over HBM bandwidth.
// Same math, operands and dequantization as the tiled kernel (moe/gemm.cuh, moe/formats.cuh);
// what differs is how the bytes move.
//
// Work: a unit is (block b, tile t): 16 weight rows x all of K for the block's <= 8 * NT pair
//   rows (gated: the 8 gate rows 8t..8t+7 and their 8 up rows I + 8t.., so the activation is
//   computed from one lane's accumulators). Units are numbered block-major and the grid is one
//   CTA per SM: CTA c owns units [c U / G, (c + 1) U / G), U = num_blocks * tiles read on the
//   device (no host sync), so every SM streams the same bytes to within one unit (23 KB for a
//   gpt-oss-20b MXFP4 tile) however the routing fell, and empty experts cost nothing.
// CTA: one producer warp and C consumer warps. Consumer w takes the CTA's units w, w + C, ...
//   and accumulates each over all of K in registers (no partial sums cross warps); its epilogue
//   (bias, gated activation, routing weight, one rounding) runs from registers.
// Producer: moves every byte with bulk asynchronous copies (cp.async.bulk, completion counted in
//   bytes on an mbarrier, moe/tma.cuh): per consumer a ring of kStreamStages stages, a stage being
//   its unit's 16 rows x slice_bytes of K (and their scales), so 100-160 KB per SM are in flight
//   whatever the number of busy consumers (the tiled kernel holds ~4 KB per warp in registers);
//   and once per block the block's pair rows of x, by index, into an x slot (one or two), with
//   their pair ids and routing weights. It never blocks: it polls every ring and the next x slot
//   in turn, so a consumer waiting for the next block's x never holds up another's weights.
// Consumers: wait for a stage, read weight vectors and x from shared memory, dequantize in
//   registers, mma.sync m16n8k16 with swapped operands, release the stage. Row pitches keep each
//   quarter-warp's 16-byte reads on distinct banks: weight rows 64 mod 128 bytes apart, x rows
//   F::kXPitchMod apart (MXFP4 also swaps the word order of lanes c >= 2).
// Ordering of the x slots: every consumer waits for every block of its CTA's range in turn (even
//   one without units of its own) and releases it after its last unit there, so a slot's phases
//   advance one block at a time.
// Decode is memory-bound for dense and FP8 weights; MXFP4 spends ~80 instructions per 16-byte
// vector on dequantization, so its consumers issue near the SM's limit at full HBM rate (hence
// more consumer warps). Needs sm_90 (bulk copies, transaction-count barriers).
#pragma once

#include <cstdint>
#include <string>

#include "common/common.cuh"
#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "kernels/moe_kernels.h"
#include "moe/formats.cuh"
#include "moe/tma.cuh"

namespace moelora::cuda::moe {

constexpr int kStreamMaxConsumers = kMoeMaxStreamConsumers;
constexpr int kStreamStages = 2;        // ring slots per consumer
constexpr int kStreamRangeBlocks = 64;  // blocks one CTA's unit range may span
constexpr int kStreamMaxBlockRows = 16; // block_m 8 or 16: NT = 1 or 2 n-tiles of 8 pair rows
constexpr int kUnitRows = 16;           // weight rows per unit (one m16 tile)
constexpr int kStepBytes = 64;          // weight bytes of a row per k-step (4 lanes x 16)

// Where everything sits in shared memory; computed on the host (stream_layout) for one call.
struct StreamLayout {
  int32_t consumers;     // C, <= kStreamMaxConsumers
  int32_t block_m;       // 8 * NT
  int64_t tiles;         // units per block
  int32_t slices;        // stages per unit: ceil(row_bytes / slice_bytes)
  int32_t slice_bytes;   // weight bytes of a row per stage, a multiple of kStepBytes
  int32_t w_pitch;       // bytes between a stage's weight rows, 64 mod 128
  int32_t scale_offset;  // where a stage's scales start, bytes from the stage
  int32_t s_pitch;       // scale bytes per row (MXFP4) or per row block of a half (FP8)
  int32_t stage_bytes;   // a multiple of 128
  int32_t x_pitch;       // bytes between x rows, F::kXPitchMod mod 128
  int32_t x_slot_bytes;  // block_m * x_pitch
  int32_t x_slots;       // 1 or 2
  int32_t x_offset;      // x slot 0, bytes from the start of shared memory
  int32_t ring_offset;   // consumer 0's ring
  int32_t smem_bytes;
};

// The fixed part of shared memory, at its start.
struct StreamHeader {
  uint64_t full[kStreamMaxConsumers][kStreamStages];   // a stage landed (1 arrival + bytes)
  uint64_t empty[kStreamMaxConsumers][kStreamStages];  // its consumer is done with it (1)
  uint64_t x_full[2];   // a block's x landed (1 arrival + bytes)
  uint64_t x_empty[2];  // every consumer is done with the block (C arrivals)
  int32_t expert[kStreamRangeBlocks];  // expert of each block of the CTA's range
  int32_t pair[2][kStreamMaxBlockRows];  // per x slot: pair id of each row, -1 past the pairs
  float topk[2][kStreamMaxBlockRows];    // per x slot: routing weight of each row (w2)
};

// Row r (0..15) of tile t: gated, the gate row 8t + r (r < 8) or the up row I + 8t + r - 8;
// otherwise row 16t + r. `ok` is false past the rows that exist.
__device__ __forceinline__ void unit_row(const GemmArgs& a, int64_t tile, int r, int64_t& n,
                                         bool& ok) {
  if (a.gated) {
    const int64_t j = 8 * tile + (r & 7);
    ok = j < a.inter;
    n = r < 8 ? j : a.inter + j;
  } else {
    n = kUnitRows * tile + r;
    ok = n < a.n_dim;
  }
}

// Global address of the first scale a stage of row n needs (its K bytes start at kb0).
__device__ __forceinline__ uintptr_t mxfp4_scale_at(const GemmArgs& a, int64_t e, int64_t n,
                                                    int kb0) {
  // one E8M0 byte per 16 weight bytes
  return reinterpret_cast<uintptr_t>(a.scales) + e * a.s_expert + n * a.s_row + kb0 / 16;
}
__device__ __forceinline__ uintptr_t fp8_scale_at(const GemmArgs& a, int64_t e, int64_t n,
                                                  int kb0) {
  const int64_t index = e * a.s_expert + (n / a.block_n) * a.s_row + kb0 / a.block_k;
  return reinterpret_cast<uintptr_t>(static_cast<const float*>(a.scales) + index);
}

__device__ __forceinline__ uint32_t bar_at(uint64_t& b) { return ptx::smem_u32(&b); }

// Lane 0 asks whether a phase completed; every lane gets the same answer.
__device__ __forceinline__ bool warp_test_wait(uint64_t& b, uint32_t parity) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  bool done = false;
  if (lane == 0) done = tma::test_wait(bar_at(b), parity);
  return __shfl_sync(0xffffffffu, done ? 1 : 0, 0) != 0;
}

// ---- producer -----------------------------------------------------------------------------------

// One stage: lanes 0..15 copy the unit's weight rows [kb0, kb0 + len), lanes 16.. their scales
// (each an aligned superset of the bytes needed: 16-byte granules never cross a page, so reading
// a few bytes around a tensor is safe).
template <typename F>
__device__ void stream_issue(const GemmArgs& a, const StreamLayout& L, uint8_t* stage,
                             uint64_t& full, int64_t expert, int64_t tile, int kb0) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int len = min(L.slice_bytes, a.row_bytes - kb0);
  const void* src = nullptr;
  uint32_t dst = 0, bytes = 0;
  int64_t n = 0;
  bool ok = false;
  if (lane < kUnitRows) {
    unit_row(a, tile, lane, n, ok);
    if (ok) {
      src = a.weight + expert * a.w_expert + n * a.w_row + kb0;
      dst = ptx::smem_u32(stage + lane * L.w_pitch);
      bytes = static_cast<uint32_t>(len);
    }
  } else if constexpr (F::kStageScales == StageScales::kPerRow) {
    const int r = lane - kUnitRows;
    unit_row(a, tile, r, n, ok);
    if (ok) {
      const uintptr_t at = mxfp4_scale_at(a, expert, n, kb0);
      const uintptr_t lo = at & ~uintptr_t{15}, hi = (at + len / 16 + 15) & ~uintptr_t{15};
      src = reinterpret_cast<const void*>(lo);
      dst = ptx::smem_u32(stage + L.scale_offset + r * L.s_pitch);
      bytes = static_cast<uint32_t>(hi - lo);
    }
  } else if constexpr (F::kStageScales == StageScales::kRowBlocks) {
    // lanes 16..19: row block `which` (0, 1) of half `half`: 8 rows span at most two blocks
    const int half = (lane - kUnitRows) >> 1, which = (lane - kUnitRows) & 1;
    int64_t last = 0;
    bool last_ok = false;
    if (half < 2) {
      unit_row(a, tile, 8 * half, n, ok);
      for (int r = 8 * half + 7; r >= 8 * half && !last_ok; --r) {
        unit_row(a, tile, r, last, last_ok);
      }
    }
    const int64_t block = n / a.block_n + which;
    if (half < 2 && ok && block <= last / a.block_n) {
      const int count = (kb0 + len - 1) / a.block_k - kb0 / a.block_k + 1;
      const uintptr_t at = fp8_scale_at(a, expert, block * a.block_n, kb0);
      const uintptr_t lo = at & ~uintptr_t{15}, hi = (at + 4 * count + 15) & ~uintptr_t{15};
      src = reinterpret_cast<const void*>(lo);
      dst = ptx::smem_u32(stage + L.scale_offset + (2 * half + which) * L.s_pitch);
      bytes = static_cast<uint32_t>(hi - lo);
    }
  }
  const uint32_t total = __reduce_add_sync(0xffffffffu, bytes);
  if (lane == 0) tma::arrive_expect_tx(bar_at(full), total);
  __syncwarp();
  if (bytes != 0) tma::bulk_copy(dst, src, bytes, bar_at(full));
}

// Block rb of the CTA's range into x slot rb % x_slots: pair ids, routing weights, then the
// pair rows of x (by index) as bulk copies.
__device__ inline void stream_load_x(const GemmArgs& a, const StreamLayout& L, uint8_t* smem,
                              StreamHeader& h, int64_t block, int rb) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int slot = rb % L.x_slots;
  int32_t p = -1;
  if (lane < L.block_m) p = a.sorted_pairs[block * L.block_m + lane];
  const bool valid = p >= 0;
  float weight = 0.0f;
  if (valid && a.topk_weights != nullptr) weight = a.topk_weights[int64_t{p} * a.topk_stride];
  if (lane < L.block_m) {
    h.pair[slot][lane] = p;
    h.topk[slot][lane] = weight;
  }
  const uint32_t row_bytes = static_cast<uint32_t>(a.k_dim) * 2;
  const uint32_t bytes = __popc(__ballot_sync(0xffffffffu, valid)) * row_bytes;
  __syncwarp();  // the ids are written before lane 0's arrival publishes them
  uint64_t& full = h.x_full[slot];
  if (lane == 0) tma::arrive_expect_tx(bar_at(full), bytes);
  __syncwarp();
  if (valid) {
    const auto* x = static_cast<const uint8_t*>(a.input) +
                    (p / a.pairs_per_row) * a.input_stride * 2;
    uint8_t* row = smem + L.x_offset + slot * L.x_slot_bytes + lane * L.x_pitch;
    tma::bulk_copy(ptx::smem_u32(row), x, row_bytes, bar_at(full));
  }
}

// A consumer's position in the CTA's units: unit index and its (block, tile), advanced by C
// units at a time without a 64-bit division.
struct UnitCursor {
  int64_t unit, block, tile;
  __device__ void start(int64_t u, int64_t tiles) {
    unit = u;
    block = u / tiles;
    tile = u - block * tiles;
  }
  __device__ void advance(int stride, int64_t tiles) {
    unit += stride;
    tile += stride;
    while (tile >= tiles) {
      tile -= tiles;
      ++block;
    }
  }
};

template <typename F>
__device__ void stream_producer(const GemmArgs& a, const StreamLayout& L, uint8_t* smem,
                                StreamHeader& h, int64_t u0, int64_t u1, int64_t b_first,
                                int nblocks) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  for (int i = lane; i < nblocks; i += 32) h.expert[i] = a.block_expert[b_first + i];
  __syncwarp();
  const int C = L.consumers;
  // lane w < C holds consumer w's next unit and slice to stream and its stages so far
  UnitCursor mine;
  mine.start(u0 + lane, L.tiles);
  int32_t my_slice = 0;
  uint32_t my_issued = 0;
  int next_x = 0;
  uint64_t last_progress = tma::global_ns();
  for (;;) {
    bool pending = false, progress = false;
    for (int w = 0; w < C; ++w) {
      const int64_t unit = __shfl_sync(0xffffffffu, mine.unit, w);
      if (unit >= u1) continue;
      pending = true;
      const uint32_t issued = __shfl_sync(0xffffffffu, my_issued, w);
      const uint32_t slot = issued % kStreamStages;
      if (!warp_test_wait(h.empty[w][slot], ((issued / kStreamStages) & 1u) ^ 1u)) continue;
      const int64_t block = __shfl_sync(0xffffffffu, mine.block, w);
      const int64_t tile = __shfl_sync(0xffffffffu, mine.tile, w);
      const int32_t slice = __shfl_sync(0xffffffffu, my_slice, w);
      uint8_t* stage = smem + L.ring_offset + (w * kStreamStages + slot) * L.stage_bytes;
      stream_issue<F>(a, L, stage, h.full[w][slot], h.expert[block - b_first], tile,
                      slice * L.slice_bytes);
      progress = true;
      if (lane == w) {
        ++my_issued;
        if (++my_slice == L.slices) {
          my_slice = 0;
          mine.advance(C, L.tiles);
        }
      }
    }
    if (next_x < nblocks) {
      pending = true;
      // slot reuse: every consumer released the block x_slots earlier
      const bool free = next_x < L.x_slots ||
                        warp_test_wait(h.x_empty[next_x % L.x_slots],
                                       static_cast<uint32_t>(next_x / L.x_slots - 1) & 1u);
      if (free) {
        stream_load_x(a, L, smem, h, b_first + next_x, next_x);
        ++next_x;
        progress = true;
      }
    }
    if (!pending) break;
    if (progress) {
      last_progress = tma::global_ns();
    } else {
      // nothing to do until a consumer frees a stage (a stage is ~1 us of its work): leave the
      // issue slots of this SM sub-partition to the consumers meanwhile
      __nanosleep(128);
      if (tma::global_ns() - last_progress > tma::kHangNs) __trap();  // see tma::kHangNs
    }
  }
}

// ---- consumers ----------------------------------------------------------------------------------

// The stage scales of one weight row for the lane's 16-byte vector at `byte` of the slice.
template <typename F>
__device__ __forceinline__ typename F::Scale stage_scale(const GemmArgs& a, const uint8_t* scales,
                                                         int offset, int kb0, int byte) {
  if constexpr (F::kStageScales == StageScales::kPerRow) {
    return scales[offset + byte / 16];
  } else if constexpr (F::kStageScales == StageScales::kRowBlocks) {
    const uint32_t index = static_cast<uint32_t>(kb0 + byte) / static_cast<uint32_t>(a.block_k) -
                           static_cast<uint32_t>(kb0) / static_cast<uint32_t>(a.block_k);
    return *reinterpret_cast<const float*>(scales + offset + 4 * index);
  } else {
    return F::neutral_scale();
  }
}

// Byte offset of a row's scales within its stage's scale area (the aligned superset's slack).
template <typename F>
__device__ __forceinline__ int stage_scale_offset(const GemmArgs& a, const StreamLayout& L,
                                                  int64_t e, int64_t n, int row, int kb0) {
  if constexpr (F::kStageScales == StageScales::kPerRow) {
    return row * L.s_pitch + static_cast<int>(mxfp4_scale_at(a, e, n, kb0) & 15);
  } else if constexpr (F::kStageScales == StageScales::kRowBlocks) {
    const int64_t first = n - (row & 7);  // the half's first row, whose block is copy 0
    const int which = static_cast<int>(n / a.block_n - first / a.block_n);
    return (2 * (row >> 3) + which) * L.s_pitch +
           static_cast<int>(fp8_scale_at(a, e, n, kb0) & 15);
  } else {
    return 0;
  }
}

// One k-step of a lane: rows g and g + 8 (w0, w1 with scales s0, s1) against the x chunks at
// x_lane (row g of n-tile 0, the lane's first chunk). kSmall: MXFP4 with every scale of the warp
// <= 128, one multiply per pair and no branch.
template <typename F, int NT, bool kSmall>
__device__ __forceinline__ void stream_step(const uint4& w0, const uint4& w1,
                                            typename F::Scale s0, typename F::Scale s1,
                                            const uint8_t* x_lane, int x_pitch, bool flip,
                                            bool in, int nt_used, float (&acc)[NT][4]) {
  using T = typename F::Act;
  uint32_t m0 = 0, m1 = 0;
  if constexpr (kSmall) {
    m0 = F::small_multiplier(s0);
    m1 = F::small_multiplier(s1);
  }
#pragma unroll
  for (int u = 0; u < F::kChunks; ++u) {
    uint32_t a0[4], a1[4];
    if constexpr (kSmall) {
      F::a_pairs_small(w0, m0, u, a0);
      F::a_pairs_small(w1, m1, u, a1);
    } else {
      F::a_pairs(w0, s0, u, a0);
      F::a_pairs(w1, s1, u, a1);
    }
    const uint32_t lo[4] = {a0[0], a1[0], a0[1], a1[1]};
    const uint32_t hi[4] = {a0[2], a1[2], a0[3], a1[3]};
    const uint8_t* x_chunk = x_lane + 16 * (flip ? (u ^ 1) : u);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      if (j == 0 || j < nt_used) {
        uint4 xv = make_uint4(0, 0, 0, 0);
        if (in) xv = *reinterpret_cast<const uint4*>(x_chunk + 8 * j * x_pitch);
        uint32_t b[4];
        F::b_pairs(xv, b);
        ptx::mma16816<T>(acc[j], lo, b[0], b[1]);
        ptx::mma16816<T>(acc[j], hi, b[2], b[3]);
      }
    }
  }
}

// Unit (block rb of the range, tile) by consumer warp w: all K, then the epilogue.
template <typename F, int NT>
__device__ void stream_unit(const GemmArgs& a, const StreamLayout& L, uint8_t* ring,
                            StreamHeader& h, int w, uint32_t& consumed, int64_t expert,
                            int64_t tile, const uint8_t* xs, int x_slot, int nt_used) {
  using T = typename F::Act;
  const int lane = static_cast<int>(threadIdx.x & 31), g = lane >> 2, c = lane & 3;
  int64_t n0, n1;
  bool ok0, ok1;
  unit_row(a, tile, g, n0, ok0);
  unit_row(a, tile, g + 8, n1, ok1);
  // issued now, used in the epilogue: the unit's stages hide the latency
  const float bias0 = ok0 ? load_bias(a, expert, n0) : 0.0f;
  const float bias1 = ok1 ? load_bias(a, expert, n1) : 0.0f;
  const bool flip = F::kFlipHalves && (c >= 2);
  const uint8_t* x_row = xs + g * L.x_pitch;
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[j][v] = 0.0f;
  }
  for (int s = 0; s < L.slices; ++s) {
    const uint32_t slot = consumed % kStreamStages;
    tma::wait(bar_at(h.full[w][slot]), (consumed / kStreamStages) & 1u);
    const uint8_t* stage = ring + slot * L.stage_bytes;
    const uint8_t* scales = stage + L.scale_offset;
    const int kb0 = s * L.slice_bytes;
    const int len = min(L.slice_bytes, a.row_bytes - kb0);
    const int off0 = stage_scale_offset<F>(a, L, expert, n0, g, kb0);
    const int off1 = stage_scale_offset<F>(a, L, expert, n1, g + 8, kb0);
    const int steps = (len + kStepBytes - 1) / kStepBytes;
    for (int step = 0; step < steps; ++step) {
      const int byte = step * kStepBytes + 16 * c;
      const bool in = byte < len;  // false only in a row's last step
      uint4 w0 = make_uint4(0, 0, 0, 0), w1 = w0;
      typename F::Scale s0 = F::neutral_scale(), s1 = F::neutral_scale();
      if (in) {
        w0 = *reinterpret_cast<const uint4*>(stage + g * L.w_pitch + byte);
        w1 = *reinterpret_cast<const uint4*>(stage + (g + 8) * L.w_pitch + byte);
        s0 = stage_scale<F>(a, scales, off0, kb0, byte);
        s1 = stage_scale<F>(a, scales, off1, kb0, byte);
      }
      if (flip) {  // words 1, 0, 3, 2: see F::kFlipHalves
        w0 = make_uint4(w0.y, w0.x, w0.w, w0.z);
        w1 = make_uint4(w1.y, w1.x, w1.w, w1.z);
      }
      const uint8_t* x_lane = x_row + (kb0 + byte) * F::kXBytesPerWeightByte;
      if constexpr (F::kStageScales == StageScales::kPerRow) {
        if (__any_sync(0xffffffffu, s0 > 128u || s1 > 128u)) {
          stream_step<F, NT, false>(w0, w1, s0, s1, x_lane, L.x_pitch, flip, in, nt_used, acc);
        } else {
          stream_step<F, NT, true>(w0, w1, s0, s1, x_lane, L.x_pitch, flip, in, nt_used, acc);
        }
      } else {
        stream_step<F, NT, false>(w0, w1, s0, s1, x_lane, L.x_pitch, flip, in, nt_used, acc);
      }
    }
    __syncwarp();
    if (lane == 0) tma::arrive(bar_at(h.empty[w][slot]));
    ++consumed;
  }

  // epilogue: acc[j] = {(row g, pair row 8j + 2c), (g, 8j + 2c + 1), (g + 8, 8j + 2c),
  // (g + 8, 8j + 2c + 1)}
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    if (j >= nt_used) continue;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = 8 * j + 2 * c + e;
      const int32_t p = h.pair[x_slot][r];
      if (p < 0) continue;
      const float weight = a.topk_weights != nullptr ? h.topk[x_slot][r] : 1.0f;
      T* out = static_cast<T*>(a.output) + int64_t{p} * a.output_stride;
      if (a.gated) {
        if (!ok0) continue;  // the gate row and its up row exist together
        const float gate = acc[j][e] + bias0, up = acc[j][2 + e] + bias1;
        const float value = a.activation == MoeActivation::kSilu
                                ? moe_math::silu_glu(gate, up)
                                : moe_math::gpt_oss_glu(gate, up, a.alpha, a.limit);
        out[n0] = detail::from_f32<T>(value * weight);
      } else {
        if (ok0) out[n0] = detail::from_f32<T>((acc[j][e] + bias0) * weight);
        if (ok1) out[n1] = detail::from_f32<T>((acc[j][2 + e] + bias1) * weight);
      }
    }
  }
}

template <typename F, int NT>
__device__ void stream_consumer(const GemmArgs& a, const StreamLayout& L, uint8_t* smem,
                                StreamHeader& h, int w, int64_t u0, int64_t u1, int64_t b_first,
                                int nblocks) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  uint8_t* ring = smem + L.ring_offset + w * kStreamStages * L.stage_bytes;
  uint32_t consumed = 0;
  UnitCursor unit;
  unit.start(u0 + w, L.tiles);
  for (int rb = 0; rb < nblocks; ++rb) {
    const int slot = rb % L.x_slots;
    tma::wait(bar_at(h.x_full[slot]), static_cast<uint32_t>(rb / L.x_slots) & 1u);
    const int64_t block = b_first + rb;
    // n-tiles holding pairs (pairs come first in a block; the highest one counts)
    const uint32_t rows =
        __ballot_sync(0xffffffffu, lane < L.block_m && h.pair[slot][lane] >= 0);
    const int nt_used = (32 - __clz(static_cast<int>(rows)) + 7) / 8;
    const uint8_t* xs = smem + L.x_offset + slot * L.x_slot_bytes;
    while (unit.unit < u1 && unit.block == block) {
      stream_unit<F, NT>(a, L, ring, h, w, consumed, h.expert[rb], unit.tile, xs, slot, nt_used);
      unit.advance(L.consumers, L.tiles);
    }
    __syncwarp();
    if (lane == 0) tma::arrive(bar_at(h.x_empty[slot]));
  }
}

// ---- the kernel ---------------------------------------------------------------------------------

template <typename F, int NT>
__global__ void __launch_bounds__(32 * (kStreamMaxConsumers + 1), 1)
    moe_stream_kernel(GemmArgs a, StreamLayout L) {
  extern __shared__ __align__(16) uint8_t smem[];
  auto& h = *reinterpret_cast<StreamHeader*>(smem);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  if (threadIdx.x == 0) {
    for (int w = 0; w < L.consumers; ++w) {
      for (int s = 0; s < kStreamStages; ++s) {
        tma::init(bar_at(h.full[w][s]), 1);
        tma::init(bar_at(h.empty[w][s]), 1);
      }
    }
    for (int s = 0; s < 2; ++s) {
      tma::init(bar_at(h.x_full[s]), 1);
      tma::init(bar_at(h.x_empty[s]), static_cast<uint32_t>(L.consumers));
    }
    tma::fence_init();
  }
  __syncthreads();
  wait_for_previous_grid();  // memory only from here (common/launch.cuh)

  const int64_t units = int64_t{*a.num_blocks} * L.tiles;
  const int64_t u0 = units * blockIdx.x / gridDim.x, u1 = units * (blockIdx.x + 1) / gridDim.x;
  if (u0 < u1) {
    const int64_t b_first = u0 / L.tiles;
    const int nblocks = static_cast<int>((u1 - 1) / L.tiles - b_first + 1);
    if (warp == 0) {
      stream_producer<F>(a, L, smem, h, u0, u1, b_first, nblocks);
    } else if (warp <= L.consumers) {
      stream_consumer<F, NT>(a, L, smem, h, warp - 1, u0, u1, b_first, nblocks);
    }
  }
  release_next_grid();
}

// ---- launch ---------------------------------------------------------------------------------

// Consumer warps per format: MXFP4 dequantization needs the issue slots of more warps.
template <typename F>
constexpr int stream_consumers() {
  return F::kStageScales == StageScales::kPerRow ? 12 : 8;
}

__host__ __forceinline__ int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// The shared-memory layout for this call, or why the stream kernel cannot take it: the largest
// stage (slice_bytes 512 down to 128) with two x slots, else one, that fits the device.
template <typename F>
std::string stream_layout(const GemmArgs& a, int block_m, int64_t max_blocks, int consumers,
                          int sm_count, int max_smem, StreamLayout& L) {
  if (block_m != 8 && block_m != 16) return "block_m must be 8 or 16";
  L = StreamLayout{};
  L.consumers = consumers > 0 ? consumers : stream_consumers<F>();
  L.block_m = block_m;
  L.tiles = a.gated ? (a.inter + 7) / 8 : (int64_t{a.n_dim} + kUnitRows - 1) / kUnitRows;
  // one CTA's range of units spans at most this many blocks
  const int64_t per_cta = (max_blocks * L.tiles + sm_count - 1) / sm_count;
  if ((per_cta + L.tiles - 2) / L.tiles + 1 > kStreamRangeBlocks) {
    return "too many blocks per SM for one CTA's expert table";
  }
  // the smallest pitch >= the row with pitch = F::kXPitchMod (mod 128)
  const int64_t x_row = int64_t{a.k_dim} * 2;
  L.x_pitch = static_cast<int32_t>(x_row + ((F::kXPitchMod - x_row) % 128 + 128) % 128);
  L.x_slot_bytes = static_cast<int32_t>(round_up(int64_t{block_m} * L.x_pitch, 128));
  L.x_offset = static_cast<int32_t>(round_up(sizeof(StreamHeader), 128));
  const int64_t row_span = round_up(a.row_bytes, kStepBytes);
  for (int slice : {512, 448, 384, 320, 256, 192, 128}) {
    if (slice > row_span && slice != 512) continue;  // a short row: its one size was tried
    const int32_t bytes = static_cast<int32_t>(slice < row_span ? slice : row_span);
    const int32_t w_pitch = bytes % 128 == 0 ? bytes + 64 : bytes;  // 64 mod 128
    int32_t s_pitch = 0, scale_bytes = 0;
    if constexpr (F::kStageScales == StageScales::kPerRow) {
      s_pitch = static_cast<int32_t>(round_up(bytes / 16 + 30, 16));
      scale_bytes = kUnitRows * s_pitch;
    } else if constexpr (F::kStageScales == StageScales::kRowBlocks) {
      // the row block's scales over [kb0, kb0 + bytes): at most (bytes - 1) / block_k + 2
      s_pitch = static_cast<int32_t>(round_up(4 * ((bytes - 1) / a.block_k + 2) + 30, 16));
      scale_bytes = 4 * s_pitch;
    }
    const int32_t stage = static_cast<int32_t>(round_up(kUnitRows * w_pitch + scale_bytes, 128));
    for (int slots : {2, 1}) {
      const int64_t ring = int64_t{L.x_offset} + int64_t{slots} * L.x_slot_bytes;
      const int64_t total = ring + int64_t{L.consumers} * kStreamStages * stage;
      if (total <= max_smem) {
        L.slice_bytes = bytes;
        L.slices = static_cast<int32_t>((a.row_bytes + bytes - 1) / bytes);
        L.w_pitch = w_pitch;
        L.scale_offset = kUnitRows * w_pitch;
        L.s_pitch = s_pitch;
        L.stage_bytes = stage;
        L.x_slots = slots;
        L.ring_offset = static_cast<int32_t>(ring);
        L.smem_bytes = static_cast<int32_t>(total);
        return "";
      }
    }
  }
  return "the block's x rows (" + std::to_string(block_m) + " x " + std::to_string(a.k_dim) +
         ") and the weight rings do not fit in shared memory";
}

template <typename F, int NT>
void launch_stream_shape(const GemmArgs& a, const StreamLayout& L, int64_t max_blocks,
                         int sm_count, cudaStream_t stream) {
  auto* kernel = moe_stream_kernel<F, NT>;
  detail::allow_dynamic_smem(kernel, static_cast<size_t>(L.smem_bytes));
  LaunchShape shape;
  const int64_t units = max_blocks * L.tiles;
  shape.grid = dim3(static_cast<unsigned>(units < sm_count ? units : sm_count));
  shape.block = dim3(32 * (L.consumers + 1));
  shape.smem = static_cast<size_t>(L.smem_bytes);
  shape.stream = stream;
  shape.after_previous_grid = true;
  launch_kernel(kernel, shape, a, L);
}

// Launches the stream kernel, or returns why it cannot take the call (nothing launched).
template <typename F>
std::string launch_stream(const GemmArgs& a, int block_m, int64_t max_blocks, int consumers,
                          cudaStream_t stream) {
  int device = 0, major = 0, max_smem = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return "needs sm_90 or newer (bulk copies)";
  if constexpr (F::kStageScales == StageScales::kRowBlocks) {
    if (a.block_n < 8) return "FP8 needs block_n >= 8 (8 rows span at most two row blocks)";
  }
  MOELORA_CUDA_CHECK(
      cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int sms = detail::sm_count();
  StreamLayout L;
  const std::string refusal =
      stream_layout<F>(a, block_m, max_blocks, consumers, sms, max_smem, L);
  if (!refusal.empty()) return refusal;
  if (max_blocks * L.tiles == 0) return "";
  if (block_m == 8) {
    launch_stream_shape<F, 1>(a, L, max_blocks, sms, stream);
  } else {
    launch_stream_shape<F, 2>(a, L, max_blocks, sms, stream);
  }
  return "";
}

// Launchers of one format each (moe/stream_<format>.cu): "" when launched, else the refusal.
// consumers: consumer warps, 0 for the format's choice.
std::string launch_stream_dense(const GemmArgs& a, DType dtype, int block_m, int64_t max_blocks,
                                int consumers, cudaStream_t stream);
std::string launch_stream_fp8(const GemmArgs& a, int block_m, int64_t max_blocks, int consumers,
                              cudaStream_t stream);
std::string launch_stream_mxfp4(const GemmArgs& a, int block_m, int64_t max_blocks,
                                int consumers, cudaStream_t stream);

}  // namespace moelora::cuda::moe
