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
// Files: moe/stream_common.cuh (constants, layout, shared header), moe/stream_producer.cuh,
// moe/stream_consumer.cuh; here the kernel, the host-side layout of a call and the launch.
#pragma once

#include <cstdint>
#include <string>

#include "common/common.cuh"
#include "common/launch.cuh"
#include "kernels/moe_kernels.h"
#include "moe/formats.cuh"
#include "moe/stream_common.cuh"
#include "moe/stream_consumer.cuh"
#include "moe/stream_producer.cuh"
#include "moe/tma.cuh"

namespace moelora::cuda::moe {

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
// MXFP4 by a.mxfp4_layout, as launch_gemm_mxfp4.
std::string launch_stream_mxfp4(const GemmArgs& a, int block_m, int64_t max_blocks,
                                int consumers, cudaStream_t stream);
std::string launch_stream_mxfp4_mma(const GemmArgs& a, int block_m, int64_t max_blocks,
                                    int consumers, cudaStream_t stream);

}  // namespace moelora::cuda::moe
