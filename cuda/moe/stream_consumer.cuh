// The stream kernel's consumer warps (moe/stream.cuh): each takes whole units (16 weight rows x
// all of K for one block), reads its ring's stages and the block's x slot, dequantizes and
// multiplies (moe/formats.cuh), and runs the epilogue from registers.
#pragma once

#include <cstdint>

#include "common/common.cuh"
#include "common/ptx.cuh"
#include "kernels/moe_kernels.h"
#include "moe/formats.cuh"
#include "moe/stream_common.cuh"
#include "moe/tma.cuh"

namespace moelora::cuda::moe {

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

}  // namespace moelora::cuda::moe
