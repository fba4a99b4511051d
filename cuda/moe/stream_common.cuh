// What the stream kernel's producer and consumers share (moe/stream.cuh): its constants, the
// shared-memory layout the host computes for a call, the fixed header at the start of shared
// memory (barriers, the block table, the x slots' pair ids and routing weights), a unit's rows
// and the addresses of their scales, and a consumer's walk over the CTA's units.
#pragma once

#include <cstdint>

#include "common/ptx.cuh"
#include "moelora/moe.h"
#include "moe/formats.cuh"
#include "moe/tma.cuh"

namespace moelora::cuda::moe {

constexpr int kStreamMaxConsumers = kMoeMaxStreamConsumers;
constexpr int kStreamStages = 2;          // ring slots per consumer
constexpr int kStreamRangeBlocks = 64;    // blocks one CTA's unit range may span
constexpr int kStreamMaxBlockRows = 16;   // block_m 8 or 16: NT = 1 or 2 n-tiles of 8 pair rows
constexpr int kUnitRows = 16;             // weight rows per unit (one m16 tile)
constexpr int kStepBytes = 64;            // weight bytes of a row per k-step (4 lanes x 16)

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

}  // namespace moelora::cuda::moe
