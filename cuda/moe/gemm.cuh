// The tensor-core expert GEMM of moe_expert_gemm: weights streamed from HBM as stored (bf16 /
// fp16, MXFP4, block FP8), dequantized in registers straight into mma.sync operands.
//
// Math (per block b of block_m pair rows, expert e; contract in include/moelora/moe.h):
//   out[p, n] = epilogue(sum_k x[p / ipr, k] * W[e, n, k]),  fp32 accumulation.
// Swapped operands ("swap AB"): the m16n8k16 mma's M side is 16 weight rows (A, row-major as
//   stored: K contiguous), its N side 8 pair rows (B, the activations). At decode a block holds
//   1..32 pairs, so the 8-wide side fits them and the 16-wide side streams weights.
// Permuted K: the sum over k does not care about order, so each lane's A fragment is built from
//   the bytes it loads itself: lane (g = lane/4, c = lane%4) of a k-step reads one 16-byte
//   vector of rows g and g+8 at byte 16c (the 4 lanes of a row cover 64 contiguous bytes: 32
//   bf16, 64 fp8 or 128 e2m1 elements), and the B fragment of the same lane is gathered from the
//   same k positions of its pair row: no shuffles, no shared-memory staging of weights, one
//   16-byte load per row per k-step. MXFP4 pairs nibble q with nibble q+4 of a word (one shift
//   and mask for both halves of a bf16x2) and B takes the matching pair with one prmt.
// Dequantization: MXFP4 codes are placed into bf16 bit fields (value * 2^-126, subnormal for
//   code 1, as Marlin does) and multiplied by 2^(scale-1) (two multiplies for scales > 128), all
//   exact; FP8 goes e4m3x2 -> f16x2 (hardware cvt) -> f32 * block scale -> bf16 (the rounding
//   models/quantized.py's dequantization does). Dense bf16/fp16 needs nothing.
// Grid: x = weight row tile (64 * MT rows: MT m-tiles of 16 per warp, 4 warps), y = block. A
//   gated epilogue tiles output columns instead: 32 * MT gate rows j and the 32 * MT up rows
//   I + j in one CTA (warps 0-1 gate, 2-3 up). Blocks past num_blocks exit before reading
//   anything else, so experts with no rows cost nothing; n-tiles of 8 pairs past the block's
//   rows are skipped.
// Pipelines: weights (and their scales) run kDepth k-steps ahead in registers; the block's pair
//   rows of x are gathered BY INDEX (no copy of x) into a kStages-deep cp.async ring of
//   128-element stages in shared memory shared by the 4 warps, 16-byte chunks XOR-swizzled per
//   format so that each lane's 16-byte reads are free of bank conflicts.
// Epilogue: accumulators -> shared memory (fp32, [pair row][weight row], padded) -> + bias,
//   activation (gate/up from the same CTA), x routing weight, one rounding, coalesced stores.
// Decode is weight-bandwidth-bound (each touched expert's weights read once per block, 16-byte
// loads, ~4 KB in flight per warp); prefill (MT = 2, 64 rows per block) reuses each weight
// element 64 times from registers and is bound by the mma and dequantization issue rate.
//
// Why not CUTLASS (checked against nvidia-cutlass 4.2.0.0): its Hopper mixed-input collectives
// (sm90_mma_*_warpspecialized_mixed_input) load both operands by TMA (no index-gathered rows),
// take scales in the MMA's element type rather than E8M0 per 32 elements, and have no e2m1 input
// on sm90; the gather and the epilogues here would have to be rebuilt around them anyway.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "common/common.cuh"
#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "kernels/moe_kernels.h"

namespace moelora::cuda::moe {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kStageK = 128;             // x elements per row per shared-memory stage
constexpr int kStageChunks = kStageK / 8;  // 16-byte chunks per row per stage
constexpr int kStages = 4;
constexpr int kRowPad = 4;               // floats of padding per epilogue row (bank spread)

// What the launcher passes; pointers are validated by moe_ops.cpp.
struct GemmArgs {
  const void* input;  // [rows][K], row stride input_stride (elements)
  int64_t input_stride;
  int32_t pairs_per_row;
  void* output;  // [P][out_cols], row stride output_stride (elements)
  int64_t output_stride;
  const uint8_t* weight;  // expert e, row n at weight + e * w_expert + n * w_row (bytes)
  int64_t w_expert, w_row;
  int32_t row_bytes;     // bytes of one weight row (K * element bits / 8)
  const void* scales;    // MXFP4: uint8 [E][N][K/32]; FP8: float [E][N/bn][K/bk]
  int64_t s_expert, s_row;  // elements; FP8: s_row is the stride of a row block
  int32_t block_n, block_k;  // FP8
  const void* bias;      // [E][N] or null
  int64_t b_expert, b_row;
  DType bias_dtype;
  int32_t n_dim, k_dim;
  bool gated;
  int32_t inter;  // N / 2 when gated
  MoeActivation activation;
  float alpha, limit;
  const float* topk_weights;  // [P] stride topk_stride, or null
  int64_t topk_stride;
  const int32_t* sorted_pairs;  // [max_blocks * block_m]
  const int32_t* block_expert;
  const int32_t* num_blocks;
};

// ---- formats: one 16-byte weight vector per row per k-step ----------------------------------
// kChunks: 16-byte chunks of x (8 elements) a lane reads per k-step; chunk u feeds mma sub-steps
// 2u and 2u+1. a_pairs(u) gives, for one row, the bf16x2 / f16x2 operands of those sub-steps in
// the order {2u: k 2c..2c+1, 2u: k 2c+8..2c+9, 2u+1: ..., 2u+1: ...}; b_pairs gives the x
// operands of the same k positions from the chunk's 4 words.

template <typename T>
struct DenseFormat {
  using Act = T;
  static constexpr int kChunks = 1;
  struct Scale {};
  __device__ static int64_t scale_row(const GemmArgs&, int64_t, int64_t) { return 0; }
  __device__ static Scale load_scale(const GemmArgs&, int64_t, int, bool) { return {}; }
  __device__ static void a_pairs(const uint4& w, Scale, int, uint32_t (&a)[4]) {
    a[0] = w.x;
    a[1] = w.y;
    a[2] = w.z;
    a[3] = w.w;
  }
  __device__ static void b_pairs(const uint4& x, uint32_t (&b)[4]) {
    b[0] = x.x;
    b[1] = x.y;
    b[2] = x.z;
    b[3] = x.w;
  }
  // Lanes c of rows r, r+1 read chunks 4s + c: the odd row's half moves by 4 chunks.
  __device__ static int swizzle(int row, int chunk) { return chunk ^ ((row & 1) << 2); }
};

struct Fp8Format {
  using Act = __nv_bfloat16;
  static constexpr int kChunks = 2;
  using Scale = float;
  // Where the scales of weight row n of expert e start (its row block's), once per kernel.
  __device__ static int64_t scale_row(const GemmArgs& a, int64_t e, int64_t n) {
    return e * a.s_expert + (n / a.block_n) * a.s_row;
  }
  // The block scale of the lane's 16 elements [k0, k0 + 16) (block_k % 16 == 0).
  __device__ static Scale load_scale(const GemmArgs& a, int64_t row, int k0, bool ok) {
    return ok ? __ldg(static_cast<const float*>(a.scales) + row + k0 / a.block_k) : 0.0f;
  }
  __device__ static uint32_t pair(uint32_t word, int half, float scale) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
        static_cast<__nv_fp8x2_storage_t>(word >> (16 * half)), __NV_E4M3);
    __half2 v;
    memcpy(&v, &h, 4);
    const float2 f = __half22float2(v);
    return ptx::pack2<__nv_bfloat16>(f.x * scale, f.y * scale);
  }
  __device__ static void a_pairs(const uint4& w, Scale scale, int u, uint32_t (&a)[4]) {
    const uint32_t lo = u == 0 ? w.x : w.z, hi = u == 0 ? w.y : w.w;
    a[0] = pair(lo, 0, scale);
    a[1] = pair(lo, 1, scale);
    a[2] = pair(hi, 0, scale);
    a[3] = pair(hi, 1, scale);
  }
  __device__ static void b_pairs(const uint4& x, uint32_t (&b)[4]) {
    b[0] = x.x;
    b[1] = x.y;
    b[2] = x.z;
    b[3] = x.w;
  }
  // Lanes c of rows r, r+1 read chunks 8s + 2c + u: the odd row moves to the other parity.
  __device__ static int swizzle(int row, int chunk) { return chunk ^ (row & 1); }
};

struct Mxfp4Format {
  using Act = __nv_bfloat16;
  static constexpr int kChunks = 4;
  using Scale = uint32_t;  // the E8M0 byte
  __device__ static int64_t scale_row(const GemmArgs& a, int64_t e, int64_t n) {
    return e * a.s_expert + n * a.s_row;
  }
  // The exponent of the lane's block of 32 elements at k0.
  __device__ static Scale load_scale(const GemmArgs& a, int64_t row, int k0, bool ok) {
    return ok ? __ldg(static_cast<const uint8_t*>(a.scales) + row + k0 / 32) : 0u;
  }
  // Nibbles q and q + 4 of `word` as a bf16x2 of value * 2^-126 (sign to bit 15, exponent and
  // mantissa bits to bits 6-8 of each half).
  template <int Q>
  __device__ static uint32_t bits(uint32_t word) {
    constexpr int kEm = 6 - 4 * Q;  // shift of the exponent/mantissa bits (right when < 0)
    constexpr int kSign = 12 - 4 * Q;
    uint32_t em;
    if constexpr (kEm >= 0) {
      em = word << kEm;
    } else {
      em = word >> -kEm;
    }
    return (em & 0x01C001C0u) | ((word << kSign) & 0x80008000u);
  }
  __device__ static uint32_t times(uint32_t v, uint32_t m) {
    __nv_bfloat162 a, b;
    memcpy(&a, &v, 4);
    memcpy(&b, &m, 4);
    const __nv_bfloat162 r = __hmul2(a, b);
    uint32_t out;
    memcpy(&out, &r, 4);
    return out;
  }
  __device__ static void a_pairs(const uint4& w, Scale scale, int u, uint32_t (&a)[4]) {
    const uint32_t word = u == 0 ? w.x : u == 1 ? w.y : u == 2 ? w.z : w.w;
    a[0] = bits<0>(word);
    a[1] = bits<1>(word);
    a[2] = bits<2>(word);
    a[3] = bits<3>(word);
    // value * 2^-126 * 2^(scale - 1) = value * 2^(scale - 127); 2^(scale - 1) is a normal bf16
    // up to scale 128, beyond it the product goes through 2^126 first.
    if (scale <= 128u) {
      const uint32_t m = (scale + 126u) << 7;
      const uint32_t m2 = m | (m << 16);
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = times(a[i], m2);
    } else {
      const uint32_t big = 0x7E807E80u;  // 2^126
      const uint32_t m = scale << 7;
      const uint32_t m2 = m | (m << 16);
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = times(times(a[i], big), m2);
    }
  }
  __device__ static uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
    return r;
  }
  // x elements (q, q + 4) of the chunk's 8, matching bits<q>.
  __device__ static void b_pairs(const uint4& x, uint32_t (&b)[4]) {
    b[0] = prmt(x.x, x.z, 0x5410u);
    b[1] = prmt(x.x, x.z, 0x7632u);
    b[2] = prmt(x.y, x.w, 0x5410u);
    b[3] = prmt(x.y, x.w, 0x7632u);
  }
  // Lanes c of rows r, r+1 read chunks 4c + u: chunks 8..15 move by 2 within their bank group
  // and the odd row to the other parity.
  __device__ static int swizzle(int row, int chunk) {
    return chunk ^ (((chunk >> 3) & 1) << 1) ^ (row & 1);
  }
};

// ---- the kernel ---------------------------------------------------------------------------------

template <int MT, int NT>
struct Smem {
  static constexpr int kRows = 8 * NT;  // pair rows per block
  static constexpr int kStageBytes = kRows * kStageChunks * 16;
  static constexpr int kTileRows = 64 * MT;  // weight rows per CTA
  static constexpr int kEpilogueBytes = kRows * (kTileRows + kRowPad) * 4;
  static constexpr int kBytes = kStages * kStageBytes;
  static_assert(kEpilogueBytes <= kBytes, "the epilogue tile reuses the stages");
};

// bias[e][n] as float, 0 without a bias.
__device__ __forceinline__ float load_bias(const GemmArgs& a, int64_t e, int64_t n) {
  if (a.bias == nullptr) return 0.0f;
  const int64_t at = e * a.b_expert + n * a.b_row;
  switch (a.bias_dtype) {
    case DType::kFloat32: return static_cast<const float*>(a.bias)[at];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(a.bias)[at]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(a.bias)[at]);
  }
}

// One k-step of a lane's weights: the 16-byte vectors of rows g and g + 8 of each m-tile and
// their scales.
template <typename F, int MT>
struct WeightStep {
  uint4 w[MT][2];
  typename F::Scale s[MT][2];
};

template <typename F, int MT, int NT, int D>
__global__ void __launch_bounds__(kThreads) moe_gemm_kernel(GemmArgs a) {
  using T = typename F::Act;
  using S = Smem<MT, NT>;
  constexpr int kRows = S::kRows;
  constexpr int kStepK = 32 * F::kChunks;  // k elements per k-step (4 lanes x 8 x kChunks)
  constexpr int kStepsPerStage = kStageK / kStepK;
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
      wrow[i][h] = a.weight + expert * a.w_expert + n * a.w_row + 16 * c;
    }
  }
  const int steps = (a.row_bytes + 63) / 64;
  auto load_step = [&](WeightStep<F, MT>& st, int step) {
    const int byte = step * 64 + 16 * c;
    const bool in_k = step < steps && byte < a.row_bytes;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool ok = in_k && rok[i][h];
        const auto* src = reinterpret_cast<const uint4*>(wrow[i][h] + step * 64);
        // Decode reads each weight once per step (evict first); prefill blocks of one expert
        // share it through L2.
        st.w[i][h] = !ok ? make_uint4(0, 0, 0, 0) : MT == 1 ? __ldcs(src) : __ldg(src);
        st.s[i][h] = F::load_scale(a, srow[i][h], step * kStepK + 8 * F::kChunks * c, ok);
      }
    }
  };

  // The x ring: stage st holds k [128 st, 128 st + 128) of the block's pair rows.
  const int stages = (a.k_dim + kStageK - 1) / kStageK;
  const T* x = static_cast<const T*>(a.input);
  auto load_stage = [&](int st) {
    if (st < stages) {
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

  WeightStep<F, MT> ring[D];
#pragma unroll
  for (int d = 0; d < D; ++d) load_step(ring[d], d);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) load_stage(st);

  for (int base = 0; base < steps; base += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int step = base + d;
      if (step < steps) {
        const int stage = step / kStepsPerStage;
        if (step % kStepsPerStage == 0) {
          ptx::cp_async_wait<kStages - 2>();
          __syncthreads();  // stage `stage` landed; every warp is done with stage - 1
          load_stage(stage + kStages - 1);
        }
        const uint8_t* xs = smem + (stage % kStages) * S::kStageBytes;
        const int chunk0 = (step % kStepsPerStage) * 4 * F::kChunks + c * F::kChunks;
#pragma unroll
        for (int u = 0; u < F::kChunks; ++u) {
          uint32_t ag[MT][4], ag8[MT][4];
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            F::a_pairs(ring[d].w[i][0], ring[d].s[i][0], u, ag[i]);
            F::a_pairs(ring[d].w[i][1], ring[d].s[i][1], u, ag8[i]);
          }
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            if (j < nt_used) {
              const int r = 8 * j + g;
              const uint4 xv = *reinterpret_cast<const uint4*>(
                  xs + (r * kStageChunks + F::swizzle(r, chunk0 + u)) * 16);
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
  const int cols = a.gated ? 32 * MT : 64 * MT;
  const int64_t col0 = int64_t{blockIdx.x} * cols;
  const int64_t out_width = a.gated ? a.inter : a.n_dim;
  for (int idx = tid; idx < rows * cols; idx += kThreads) {
    const int r = idx / cols, col = idx % cols;
    const int64_t out_col = col0 + col;
    if (out_col >= out_width) continue;
    const int32_t p = pair_of_row[r];
    float value = tile[r * kPitch + col] + load_bias(a, expert, out_col);
    if (a.gated) {
      const float up = tile[r * kPitch + 32 * MT + col] + load_bias(a, expert, a.inter + out_col);
      value = a.activation == MoeActivation::kSilu
                  ? moe_math::silu_glu(value, up)
                  : moe_math::gpt_oss_glu(value, up, a.alpha, a.limit);
    }
    if (a.topk_weights != nullptr) value *= a.topk_weights[int64_t{p} * a.topk_stride];
    static_cast<T*>(a.output)[int64_t{p} * a.output_stride + out_col] = detail::from_f32<T>(value);
  }
}

// ---- launch ---------------------------------------------------------------------------------

// One (MT, NT, D) shape: grid x = row (or gated column) tiles, y = max_blocks.
template <typename F, int MT, int NT, int D>
void launch_shape(const GemmArgs& a, int64_t max_blocks, cudaStream_t stream) {
  const int64_t cols = a.gated ? 32 * MT : 64 * MT;
  const int64_t width = a.gated ? a.inter : a.n_dim;
  const int64_t tiles = (width + cols - 1) / cols;
  if (tiles == 0 || max_blocks == 0) return;
  constexpr size_t kSmem = Smem<MT, NT>::kBytes;
  auto* kernel = moe_gemm_kernel<F, MT, NT, D>;
  if (kSmem > 48 * 1024) detail::allow_dynamic_smem(kernel, kSmem);
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(max_blocks));
  shape.block = dim3(kThreads);
  shape.smem = kSmem;
  shape.stream = stream;
  shape.after_previous_grid = true;
  launch_kernel(kernel, shape, a);
}

// The tensor-core GEMM for rows-per-block block_m (8, 16, 32: decode shapes, one m-tile per
// warp and 4 k-steps of weights in flight; 64: prefill, two m-tiles and 2 k-steps).
template <typename F>
void launch_gemm(const GemmArgs& a, int block_m, int64_t max_blocks, cudaStream_t stream) {
  switch (block_m) {
    case 8: return launch_shape<F, 1, 1, 4>(a, max_blocks, stream);
    case 16: return launch_shape<F, 1, 2, 4>(a, max_blocks, stream);
    case 32: return launch_shape<F, 1, 4, 4>(a, max_blocks, stream);
    case 64: return launch_shape<F, 2, 8, 2>(a, max_blocks, stream);
    default: throw InternalError("moe_expert_gemm: no tensor-core shape for block_m " +
                                 std::to_string(block_m));
  }
}

// Launchers of one format each (moe/gemm_<format>.cu), and the simple kernel (moe/simple.cu).
void launch_gemm_dense(const GemmArgs& a, DType dtype, int block_m, int64_t max_blocks,
                       cudaStream_t stream);
void launch_gemm_fp8(const GemmArgs& a, int block_m, int64_t max_blocks, cudaStream_t stream);
void launch_gemm_mxfp4(const GemmArgs& a, int block_m, int64_t max_blocks, cudaStream_t stream);
void launch_gemm_simple(const GemmArgs& a, MoeWeightFormat format, DType dtype, int block_m,
                        int64_t max_blocks, cudaStream_t stream);

}  // namespace moelora::cuda::moe
