// The stream kernel's producer warp (moe/stream.cuh): every byte a CTA reads moves as bulk
// asynchronous copies it issues, per consumer a ring of stages and per block an x slot, polled in
// turn and never waited on.
#pragma once

#include <cstdint>

#include "common/ptx.cuh"
#include "moe/formats.cuh"
#include "moe/stream_common.cuh"
#include "moe/tma.cuh"

namespace moelora::cuda::moe {

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

}  // namespace moelora::cuda::moe
