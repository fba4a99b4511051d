// The tiled tensor-core expert GEMM of moe_expert_gemm (MoeGemmKernel::kTensorCore): weights
// streamed from HBM as stored (bf16 / fp16, MXFP4, block FP8), dequantized in registers straight
// into mma.sync operands; one CTA per (row tile, block, k split). The plan's form at decode
// and, for quantized stacks, at prefill (moelora.ops.moe.GEMM_PLAN).
//
// Math (per block b of block_m pair rows, expert e; contract in include/moelora/moe.h):
//   out[p, n] = epilogue(sum_k x[p / ipr, k] * W[e, n, k]),  fp32 accumulation.
// Swapped operands ("swap AB"): the m16n8k16 mma's M side is 16 weight rows (A, row-major as
//   stored: K contiguous), its N side 8 pair rows (B, the activations). At decode a block holds
//   1..32 pairs, so the 8-wide side fits them and the 16-wide side streams weights.
// Operands, permuted K and dequantization: moe/formats.cuh.
// Grid: x = weight row tile (64 * MT rows: MT m-tiles of 16 per warp, 4 warps), y = block. A
//   gated epilogue tiles output columns instead: 32 * MT gate rows j and the 32 * MT up rows
//   I + j in one CTA (warps 0-1 gate, 2-3 up). Blocks past num_blocks exit before reading
//   anything else, so experts with no rows cost nothing; n-tiles of 8 pairs past the block's
//   rows are skipped.
// Weight rows: a warp's 16 rows of a k-step are 64 bytes a row one stored row apart, or, MXFP4
//   in the tiled layout (Mxfp4TiledFormat), one contiguous KB (GemmArgs says where bytes are).
// Pipelines: weights (and their scales) run D k-steps ahead in registers; the block's pair
//   rows of x are gathered BY INDEX (no copy of x) into a kStages-deep cp.async ring of stages
//   in shared memory shared by the 4 warps (stage_k below), 16-byte chunks XOR-swizzled per
//   format so that each lane's 16-byte reads are free of bank conflicts.
// Instructions per weight byte: MXFP4 decode is bound by the instructions it issues (Nsight
//   Compute, H100, gpt-oss-20b w13 at 16 tokens: 0.55 issued per scheduler-cycle at 39% of the
//   DRAM roofline). The dequantization itself, per lane per k-step: 152 instructions from
//   checkpoint words (15 integer per word of four bf16x2 and a multiply per pair), 104 from
//   words in the mma layout (9 integer per word, src/mxfp4_layout.h; the engine's layout),
//   whose pairs are also the x words' own (no byte permute of x: 16 fewer per k-step).
//   The loop around it is kept small: one barrier per 8 KB stage, the scale's multiplier and
//   its fast-path test once per k-step (the path is chosen per warp: each path issues its own
//   mma.sync), each lane's shared x addresses and k-step bound computed once and held in
//   registers (the compiler would otherwise rebuild them from the thread index for every
//   16-byte read and every load). Static SASS of the 8-row kernel, sm_90a, per k-step: the fast
//   path's block of dequantization and mma 186 instructions (211 with permuted x and per-load
//   bounds), and 38 from its last mma to the next step's path vote (48 with them); from
//   checkpoint words the whole fast k-step is ~306 (docs/performance.md has what the loop's
//   instructions cost in time).
// Epilogue: accumulators -> shared memory (fp32, [pair row][weight row], padded) -> + bias,
//   activation (gate/up from the same CTA), x routing weight, one rounding, coalesced stores.
// Split-K (grid z > 1, decode): a decode grid of (row tile, block) CTAs can hold less than one
//   wave of the GPU's resident CTAs (gpt-oss-20b w2 at one token: 180 CTAs), and each warp's
//   load -> dequantize -> mma chain then paces the kernel rather than HBM. CTA z takes a
//   contiguous range of whole x stages of k-steps and stores its fp32 tile, before bias, to
//   a partials workspace; moe/split.cu adds the splits in order z = 0, 1, .. (the same bits on
//   every run) and applies the epilogue above. No atomics, no zeroing.
// Decode is weight-bandwidth-bound (each touched expert's weights read once per block, 16-byte
// loads, ~4 KB in flight per warp); prefill (MT = 2, 64 rows per block) reuses each weight
// element 64 times from registers and is bound by the mma and dequantization issue rate.
//
// Why not CUTLASS (checked against nvidia-cutlass 4.2.0.0): its Hopper mixed-input collectives
// (sm90_mma_*_warpspecialized_mixed_input) load both operands by TMA (no index-gathered rows),
// take scales in the MMA's element type rather than E8M0 per 32 elements, and have no e2m1 input
// on sm90; the gather and the epilogues here would have to be rebuilt around them anyway.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "common/common.cuh"
#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "kernels/moe_kernels.h"
#include "moe/formats.cuh"

namespace moelora::cuda::moe {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kSplitStageK = 128;  // x elements per row per stage of a split-K kernel
constexpr int kStages = 4;
constexpr int kRowPad = 4;               // floats of padding per epilogue row (bank spread)

// x elements per row per shared-memory stage. Whole-K decode shapes (8..32 rows) of quantized
// weights take 8 KB stages (512 elements at 8 rows): one barrier per 4 MXFP4 k-steps instead of
// one per step, where the loop is bound by the instructions it issues. Dense weights keep 128
// (on an H100, qwen3-30b-a3b bf16 at 16 tokens: w2 138 us with 128, 157 with 512). A split-K
// CTA takes 128: a split starts on a stage, and short rows (w2 at one token, 23 MXFP4 k-steps)
// still split five ways.
template <typename F, int NT, bool kSplit>
constexpr int stage_k() {
  return !kSplit && NT <= 4 && F::kStepLocalSwizzle ? 512 / NT : kSplitStageK;
}

// k-steps (64 weight bytes of a row, 32 * F::kChunks elements) per x stage of stage_k elements.
template <typename F, int StageK = kSplitStageK>
constexpr int steps_per_stage() {
  static_assert(StageK % (32 * F::kChunks) == 0, "a stage holds whole k-steps");
  return StageK / (32 * F::kChunks);
}

// ---- the kernel ---------------------------------------------------------------------------------

template <int MT, int NT, int StageK>
struct Smem {
  static constexpr int kRows = 8 * NT;  // pair rows per block
  static constexpr int kStageChunks = StageK / 8;  // 16-byte chunks per row per stage
  static constexpr int kStageBytes = kRows * kStageChunks * 16;
  static constexpr int kTileRows = 64 * MT;  // weight rows per CTA
  static constexpr int kEpilogueBytes = kRows * (kTileRows + kRowPad) * 4;
  static constexpr int kBytes = kStages * kStageBytes;
  static_assert(kEpilogueBytes <= kBytes, "the epilogue tile reuses the stages");
};

// One k-step of a lane's weights: the 16-byte vectors of rows g and g + 8 of each m-tile and
// their scales.
template <typename F, int MT>
struct WeightStep {
  uint4 w[MT][2];
  typename F::Scale s[MT][2];
};

// The epilogue of a whole-K CTA: its fp32 tile [rows][64 MT weight rows] + bias, the gated
// activation (gate and up rows of one column in the same tile), x routing weight, one rounding,
// stores coalesced along the output columns.
template <typename T, int MT>
__device__ void store_outputs(const GemmArgs& a, const float* tile, int pitch,
                              const int32_t* pair_of_row, int rows, int64_t expert) {
  const int cols = a.gated ? 32 * MT : 64 * MT;
  const int64_t col0 = int64_t{blockIdx.x} * cols;
  const int64_t out_width = a.gated ? a.inter : a.n_dim;
  for (int idx = static_cast<int>(threadIdx.x); idx < rows * cols; idx += kThreads) {
    const int r = idx / cols, col = idx % cols;
    const int64_t out_col = col0 + col;
    if (out_col >= out_width) continue;
    const int32_t p = pair_of_row[r];
    float value = tile[r * pitch + col] + load_bias(a, expert, out_col);
    if (a.gated) {
      const float up = tile[r * pitch + 32 * MT + col] + load_bias(a, expert, a.inter + out_col);
      value = a.activation == MoeActivation::kSilu
                  ? moe_math::silu_glu(value, up)
                  : moe_math::gpt_oss_glu(value, up, a.alpha, a.limit);
    }
    if (a.topk_weights != nullptr) value *= a.topk_weights[int64_t{p} * a.topk_stride];
    static_cast<T*>(a.output)[int64_t{p} * a.output_stride + out_col] = detail::from_f32<T>(value);
  }
}

// Split-K: the CTA's fp32 tile [rows][64 MT weight rows] (its k range's sums, no bias) to
// partials[blockIdx.z][p][n], coalesced along n.
template <int MT>
__device__ void store_partials(const GemmArgs& a, const float* tile, int pitch,
                               const int32_t* pair_of_row, int rows) {
  constexpr int kTileRows = 64 * MT;
  constexpr int kHalf = 32 * MT;
  float* part = a.partials + int64_t{blockIdx.z} * a.num_pairs * a.n_dim;
  for (int idx = static_cast<int>(threadIdx.x); idx < rows * kTileRows; idx += kThreads) {
    const int r = idx / kTileRows, local = idx % kTileRows;
    int64_t n;
    bool ok;
    if (a.gated) {  // the kernel's row mapping: local [0, half) gate rows j, the rest up rows
      const int64_t j = int64_t{blockIdx.x} * kHalf + (local % kHalf);
      ok = j < a.inter;
      n = local < kHalf ? j : a.inter + j;
    } else {
      n = int64_t{blockIdx.x} * kTileRows + local;
      ok = n < a.n_dim;
    }
    if (ok) part[int64_t{pair_of_row[r]} * a.n_dim + n] = tile[r * pitch + local];
  }
}

// One CTA's work. kSplit: the k-steps of split blockIdx.z only, stored to a.partials.
template <typename F, int MT, int NT, int D, bool kSplit>
__device__ __forceinline__ void gemm_cta(const GemmArgs& a) {
  using T = typename F::Act;
  constexpr int kStageK = stage_k<F, NT, kSplit>();
  using S = Smem<MT, NT, kStageK>;
  constexpr int kRows = S::kRows;
  constexpr int kStageChunks = S::kStageChunks;
  constexpr int kStepK = 32 * F::kChunks;  // k elements per k-step (4 lanes x 8 x kChunks)
  constexpr int kStepsPerStage = steps_per_stage<F, kStageK>();
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int32_t pair_of_row[kRows];
  __shared__ int64_t offset_of_row[kRows];

  wait_for_previous_grid();  // memory only from here (common/launch.cuh)
  const int block = static_cast<int>(blockIdx.y);
  if (block >= *a.num_blocks) return;
  const int64_t expert = a.block_expert[block];
  const int tid = static_cast<int>(threadIdx.x);
  int row_valid = 0;
  if (tid < kRows) {
    const int32_t p = a.sorted_pairs[int64_t{block} * kRows + tid];
    pair_of_row[tid] = p;
    offset_of_row[tid] = p >= 0 ? (p / a.pairs_per_row) * a.input_stride : 0;
    row_valid = p >= 0;
  }
  const int rows = __syncthreads_count(row_valid);  // pairs sit first in a block
  const int nt_used = (rows + 7) / 8;

  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
  // Weight rows of this lane: m-tile i, half h -> local row warp * 16 MT + 16 i + g + 8 h.
  const uint8_t* wrow[MT][2];
  int64_t srow[MT][2];  // where the row's scales start (F::scale_row)
  bool rok[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int local = warp * 16 * MT + 16 * i + g + 8 * h;
      int64_t n;
      bool ok;
      if (a.gated) {
        const int half = 32 * MT;
        const int64_t j = int64_t{blockIdx.x} * half + (local % half);
        ok = j < a.inter;
        n = local < half ? j : a.inter + j;
      } else {
        n = int64_t{blockIdx.x} * 64 * MT + local;
        ok = n < a.n_dim;
      }
      n = ok ? n : 0;
      srow[i][h] = F::scale_row(a, expert, n);
      rok[i][h] = ok;
      wrow[i][h] = a.weight + expert * a.w_expert + (n >> 4) * a.w_tile + (n & 15) * a.w_row +
                   16 * c;
    }
  }
  // This CTA's k-steps (64 weight bytes per row each): all of them, or split blockIdx.z's
  // whole x stages.
  const int steps = (a.row_bytes + 63) / 64;
  const int step_begin = kSplit ? static_cast<int>(blockIdx.z) * a.split_steps : 0;
  const int step_end = kSplit ? min(steps, step_begin + a.split_steps) : steps;
  // The k-steps this lane's 16 bytes of row (i, h) take part in end at end_step[i][h] (rows past
  // the stack's and bytes past the row's end read nothing): one compare per load, worked out
  // once. The lane's k offset within a step is held in a register too (the compiler would
  // otherwise rebuild it from the thread index for every step).
  uint32_t lane_k = static_cast<uint32_t>(8 * F::kChunks * c);
  ptx::keep_in_register(lane_k);
  const int lane_steps = min(step_end, (a.row_bytes - 16 * c + 63) / 64);
  int end_step[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) end_step[i][h] = rok[i][h] ? lane_steps : 0;
  }
  auto load_step = [&](WeightStep<F, MT>& st, int step) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool ok = step < end_step[i][h];
        const auto* src = reinterpret_cast<const uint4*>(wrow[i][h] + step * F::kStepBytes);
        // Decode reads each weight once per step (evict first); prefill blocks of one expert
        // share it through L2.
        st.w[i][h] = !ok ? make_uint4(0, 0, 0, 0) : MT == 1 ? __ldcs(src) : __ldg(src);
        st.s[i][h] = F::load_scale(a, srow[i][h], step * kStepK + static_cast<int>(lane_k), ok);
      }
    }
  };

  // The x ring: stage st holds k [128 st, 128 st + 128) of the block's pair rows; this CTA
  // reads the stages of its k-steps (a split starts on a stage).
  const int stage_begin = step_begin / kStepsPerStage;
  const int stage_end = kSplit ? (step_end + kStepsPerStage - 1) / kStepsPerStage
                               : (a.k_dim + kStageK - 1) / kStageK;
  const T* x = static_cast<const T*>(a.input);
  auto load_stage = [&](int st) {
    if (st < stage_end) {
      uint8_t* base = smem + (st % kStages) * S::kStageBytes;
      for (int idx = tid; idx < nt_used * 8 * kStageChunks; idx += kThreads) {
        const int r = idx / kStageChunks, ch = idx % kStageChunks;
        const int64_t k = int64_t{st} * kStageK + ch * 8;
        const bool ok = r < rows && k < a.k_dim;
        const T* src = ok ? x + offset_of_row[r] + k : x;
        ptx::cp_async16(ptx::smem_u32(base + (r * kStageChunks + F::swizzle(r, ch)) * 16), src,
                        ok);
      }
    }
    ptx::cp_async_commit();
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;
    }
  }

  // The shared address of this lane's x chunk u of a k-step (pair row g, the stage ring's
  // first stage, k-step 0 of a stage): formats whose swizzle keeps a k-step's chunks within it
  // move by whole steps and stages from here, so it is worked out once, not per k-step.
  const uint32_t smem_base = ptx::smem_u32(smem);
  uint32_t x_lane[F::kChunks];
#pragma unroll
  for (int u = 0; u < F::kChunks; ++u) {
    x_lane[u] = smem_base + static_cast<uint32_t>(
                                g * kStageChunks + F::swizzle(g, c * F::kChunks + u)) * 16;
    ptx::keep_in_register(x_lane[u]);
  }
  // One k-step: its weights dequantized straight into mma operands against the x stage's
  // chunks of the step. kFast: every scale of the step takes the format's fast path.
  auto consume = [&](const WeightStep<F, MT>& st, uint32_t stage_bytes, int in_stage,
                     auto fast_path) {
    constexpr bool kFast = decltype(fast_path)::value;
    using Prepared = decltype(F::template prepare<kFast>(st.s[0][0]));
    Prepared prepared[MT][2];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      prepared[i][0] = F::template prepare<kFast>(st.s[i][0]);
      prepared[i][1] = F::template prepare<kFast>(st.s[i][1]);
    }
#pragma unroll
    for (int u = 0; u < F::kChunks; ++u) {
      uint32_t ag[MT][4], ag8[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        F::template a_pairs_prepared<kFast>(st.w[i][0], prepared[i][0], u, ag[i]);
        F::template a_pairs_prepared<kFast>(st.w[i][1], prepared[i][1], u, ag8[i]);
      }
      uint32_t lane;
      if constexpr (F::kStepLocalSwizzle) {
        lane = x_lane[u] + stage_bytes + static_cast<uint32_t>(in_stage * 4 * F::kChunks * 16);
      } else {
        lane = smem_base + stage_bytes +
               static_cast<uint32_t>(
                   g * kStageChunks + F::swizzle(g, (in_stage * 4 + c) * F::kChunks + u)) * 16;
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (NT == 1 || j < nt_used) {  // a block holds at least one pair row
          const uint4 xv = ptx::lds128(lane + j * 8 * kStageChunks * 16);
          uint32_t b[4];
          F::b_pairs(xv, b);
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            const uint32_t lo[4] = {ag[i][0], ag8[i][0], ag[i][1], ag8[i][1]};
            const uint32_t hi[4] = {ag[i][2], ag8[i][2], ag[i][3], ag8[i][3]};
            ptx::mma16816<T>(acc[i][j], lo, b[0], b[1]);
            ptx::mma16816<T>(acc[i][j], hi, b[2], b[3]);
          }
        }
      }
    }
  };

  WeightStep<F, MT> ring[D];
#pragma unroll
  for (int d = 0; d < D; ++d) load_step(ring[d], step_begin + d);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) load_stage(stage_begin + st);

  for (int base = step_begin; base < step_end; base += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int step = base + d;
      if (step < step_end) {
        const int stage = step / kStepsPerStage;
        const int in_stage = step % kStepsPerStage;
        if (in_stage == 0) {
          ptx::cp_async_wait<kStages - 2>();
          __syncthreads();  // stage `stage` landed; every warp is done with stage - 1
          load_stage(stage + kStages - 1);
        }
        const uint32_t stage_bytes = static_cast<uint32_t>((stage % kStages) * S::kStageBytes);
        bool fast = true;
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          fast = fast && F::fast(ring[d].s[i][0]) && F::fast(ring[d].s[i][1]);
        }
        // One path for the whole warp: each path issues its own mma.sync, which every lane of
        // the warp must execute together.
        fast = __all_sync(0xffffffffu, fast);
        if (fast) {
          consume(ring[d], stage_bytes, in_stage, std::true_type{});
        } else {
          consume(ring[d], stage_bytes, in_stage, std::false_type{});
        }
        load_step(ring[d], step + D);
      }
    }
  }

  // ---- epilogue ----
  ptx::cp_async_wait<0>();
  __syncthreads();  // the stages are free: the accumulator tile goes there
  release_next_grid();
  float* tile = reinterpret_cast<float*>(smem);  // [kRows][kTileRows + kRowPad]
  constexpr int kPitch = S::kTileRows + kRowPad;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int local = warp * 16 * MT + 16 * i + g;
      const int r = 8 * j + 2 * c;
      tile[r * kPitch + local] = acc[i][j][0];
      tile[(r + 1) * kPitch + local] = acc[i][j][1];
      tile[r * kPitch + local + 8] = acc[i][j][2];
      tile[(r + 1) * kPitch + local + 8] = acc[i][j][3];
    }
  }
  __syncthreads();
  if constexpr (kSplit) {
    store_partials<MT>(a, tile, kPitch, pair_of_row, rows);
  } else {
    store_outputs<T, MT>(a, tile, kPitch, pair_of_row, rows, expert);
  }
}

template <typename F, int MT, int NT, int D>
__global__ void __launch_bounds__(kThreads) moe_gemm_kernel(GemmArgs a) {
  gemm_cta<F, MT, NT, D, false>(a);
}

// Split-K runs as its own kernel so that the whole-K one keeps its registers. The one-n-tile
// shape (block_m 8) is held to 5 CTAs per SM (at most 102 registers), its residency unsplit.
template <int NT>
constexpr int split_min_ctas() {
  return NT == 1 ? 5 : 4;
}

template <typename F, int MT, int NT, int D>
__global__ void __launch_bounds__(kThreads, split_min_ctas<NT>())
    moe_gemm_split_kernel(GemmArgs a) {
  gemm_cta<F, MT, NT, D, true>(a);
}

// ---- launch ---------------------------------------------------------------------------------

// One (MT, NT, D) shape: grid x = row (or gated column) tiles, y = max_blocks, z = splits.
template <typename F, int MT, int NT, int D, bool kSplit>
void launch_shape(const GemmArgs& a, int64_t max_blocks, cudaStream_t stream) {
  const int64_t cols = a.gated ? 32 * MT : 64 * MT;
  const int64_t width = a.gated ? a.inter : a.n_dim;
  const int64_t tiles = (width + cols - 1) / cols;
  if (tiles == 0 || max_blocks == 0) return;
  constexpr size_t kSmem = Smem<MT, NT, stage_k<F, NT, kSplit>()>::kBytes;
  void (*kernel)(GemmArgs) = nullptr;
  if constexpr (kSplit) {
    kernel = moe_gemm_split_kernel<F, MT, NT, D>;
  } else {
    kernel = moe_gemm_kernel<F, MT, NT, D>;
  }
  if (kSmem > 48 * 1024) detail::allow_dynamic_smem(kernel, kSmem);
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(max_blocks),
                    static_cast<unsigned>(a.splits));
  shape.block = dim3(kThreads);
  shape.smem = kSmem;
  shape.stream = stream;
  shape.after_previous_grid = true;
  launch_kernel(kernel, shape, a);
}

// The tensor-core GEMM for rows-per-block block_m (8, 16, 32: decode shapes, one m-tile per
// warp and 4 k-steps of weights in flight, split-K when a.splits > 1; 64: prefill, two m-tiles
// and 2 k-steps, never split: moe_ops.cpp refuses it).
template <typename F>
void launch_gemm(const GemmArgs& a, int block_m, int64_t max_blocks, cudaStream_t stream) {
  const bool split = a.splits > 1;
  switch (block_m) {
    case 8:
      return split ? launch_shape<F, 1, 1, 4, true>(a, max_blocks, stream)
                   : launch_shape<F, 1, 1, 4, false>(a, max_blocks, stream);
    case 16:
      return split ? launch_shape<F, 1, 2, 4, true>(a, max_blocks, stream)
                   : launch_shape<F, 1, 2, 4, false>(a, max_blocks, stream);
    case 32:
      return split ? launch_shape<F, 1, 4, 4, true>(a, max_blocks, stream)
                   : launch_shape<F, 1, 4, 4, false>(a, max_blocks, stream);
    case 64: return launch_shape<F, 2, 8, 2, false>(a, max_blocks, stream);
    default: throw InternalError("moe_expert_gemm: no tensor-core shape for block_m " +
                                 std::to_string(block_m));
  }
}

// Launchers of one format each (moe/gemm_<format>.cu), and the simple kernel (moe/simple.cu).
void launch_gemm_dense(const GemmArgs& a, DType dtype, int block_m, int64_t max_blocks,
                       cudaStream_t stream);
void launch_gemm_fp8(const GemmArgs& a, int block_m, int64_t max_blocks, cudaStream_t stream);
// MXFP4 by a.mxfp4_layout: checkpoint words here, mma-layout words in launch_gemm_mxfp4_mma,
// their tiles in launch_gemm_mxfp4_tiled.
void launch_gemm_mxfp4(const GemmArgs& a, int block_m, int64_t max_blocks, cudaStream_t stream);
void launch_gemm_mxfp4_mma(const GemmArgs& a, int block_m, int64_t max_blocks,
                           cudaStream_t stream);
void launch_gemm_mxfp4_tiled(const GemmArgs& a, int block_m, int64_t max_blocks,
                             cudaStream_t stream);
// Split-K's finishing kernel (moe/split.cu): a.partials summed over a.splits, the epilogue,
// the output. dtype: bfloat16 or float16.
void launch_split_finish(const GemmArgs& a, DType dtype, int block_m, int64_t max_blocks,
                         cudaStream_t stream);
void launch_gemm_simple(const GemmArgs& a, MoeWeightFormat format, DType dtype, int block_m,
                        int64_t max_blocks, cudaStream_t stream);

}  // namespace moelora::cuda::moe
