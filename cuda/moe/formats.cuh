// What the MoE expert GEMM kernels share (moe/gemm.cuh, the tiled kernel; moe/stream.cuh, the
// persistent decode kernel): the launch arguments, and the weight formats as operands of the
// m16n8k16 mma with swapped operands (16 weight rows on the M side, 8 pair rows on the N side).
//
// Permuted K: the sum over k does not care about order, so each lane's A fragment is built from
//   the 16 bytes it reads itself: lane (g = lane/4, c = lane%4) of a k-step takes one 16-byte
//   vector of weight rows g and g+8 at byte 16c of the step's 64 bytes (32 bf16, 64 fp8 or 128
//   e2m1 elements per row), and its B fragment comes from the same k positions of its pair row:
//   no shuffles, no staging of weights in mma layout. MXFP4 pairs element q with element q+4 of
//   a word (both halves of a bf16x2 come out of the same shifts and masks) and B takes the
//   matching pair with one prmt.
// Dequantization: MXFP4 codes are placed into bf16 bit fields (value * 2^-126, subnormal for
//   code 1, as Marlin does) and multiplied by 2^(scale-1) (two multiplies for scales > 128), all
//   exact; FP8 goes e4m3x2 -> f16x2 (hardware cvt) -> f32 * block scale -> bf16 (the rounding
//   models/quantized.py's dequantization does). Dense bf16/fp16 needs nothing.
// Cost per 16-byte weight vector (instructions a lane issues): dense 0, FP8 ~24, MXFP4 76 from
//   checkpoint words (15 integer instructions per word of four pairs, plus a multiply per pair)
//   and 52 from words in the mma layout (9 + 4 per word: src/mxfp4_layout.h), the layout the
//   engine repacks its MXFP4 experts into at load. MXFP4 decode is close to issue-bound on an
//   H100.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cstring>

#include "common/common.cuh"
#include "common/ptx.cuh"
#include "kernels/moe_kernels.h"
#include "mxfp4_layout.h"

namespace moelora::cuda::moe {

// What the launcher passes; pointers are validated by moe_ops.cpp.
struct GemmArgs {
  const void* input;  // [rows][K], row stride input_stride (elements)
  int64_t input_stride;
  int32_t pairs_per_row;
  void* output;  // [P][out_cols], row stride output_stride (elements)
  int64_t output_stride;
  // Byte b of row n of expert e at weight + e * w_expert + (n / 16) * w_tile + (n % 16) * w_row
  // + (b / 64) * F::kStepBytes + b % 64: rows as stored (w_tile = 16 w_row, k-steps 64 bytes
  // apart), or the MXFP4 tiled layout (w_row = 64, k-steps 1024 bytes apart, w_tile its tile
  // stride; moelora/moe.h).
  const uint8_t* weight;
  int64_t w_expert, w_row, w_tile;
  int32_t row_bytes;     // bytes of one weight row (K * element bits / 8)
  const void* scales;    // MXFP4: uint8 [E][N][K/32] or tiled; FP8: float [E][N/bn][K/bk]
  int64_t s_expert, s_row;  // elements; FP8: s_row is the stride of a row block
  int64_t s_tile;           // MXFP4 tiled: the scales' tile stride (mxfp4::tiled_scale_offset)
  MoeMxfp4Layout mxfp4_layout;  // MXFP4: the simple kernel reads it; the tiled and stream
                                // kernels are built per layout (Mxfp4Format, Mxfp4MmaFormat)
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
  // Split-K of the tiled kernel (moe/gemm.cuh, grid.z = splits): CTA z sums the k-steps
  // [z * split_steps, (z + 1) * split_steps), whole x stages. One split: split_steps covers the
  // row and partials is null (the kernel's own epilogue). More: each CTA writes its fp32 sums,
  // before bias and epilogue, to partials and moe/split.cu adds the splits and applies it.
  int32_t split_steps;
  int32_t splits;
  float* partials;    // [splits][num_pairs][n_dim]: by weight row n (gated: gate j, up I + j)
  int64_t num_pairs;  // output rows
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

// ---- formats: one 16-byte weight vector per row per k-step ----------------------------------
// Also what the stream kernel needs of a format: x bytes per weight byte (where a lane's x
// chunks start), the x row pitch modulo 128 that keeps the 16-byte reads of a quarter-warp on
// distinct banks (see moe/stream.cuh), whether lanes c >= 2 take their words in the order
// 1, 0, 3, 2 (MXFP4: the four x chunks of a lane are 64 contiguous bytes, so lanes c and c + 2
// would hit the same banks), what the stage's scales are, and a scale that turns a zero vector
// into zeros (stale shared memory may hold any byte).
// kPerRow: one copy per weight row (MXFP4: a byte per 16 weight bytes); kRowBlocks: the float
// scales of the row blocks each 8-row half of a unit touches (FP8: at most two per half).
enum class StageScales : uint8_t { kNone, kPerRow, kRowBlocks };

// kStepLocalSwizzle: swizzle(r, 4 * kChunks * s + local) == 4 * kChunks * s + swizzle(r, local),
// so a lane's x addresses move by whole k-steps (moe/gemm.cuh computes them once). fast,
// prepare, a_pairs_prepared: what a k-step works out once per weight row before its kChunks
// sub-steps (MXFP4: the scale's multiplier) and the fast path it allows (ScaleAsIs: nothing).
// kChunks: 16-byte chunks of x (8 elements) a lane reads per k-step; chunk u feeds mma sub-steps
// 2u and 2u+1. a_pairs(u) gives, for one row, the bf16x2 / f16x2 operands of those sub-steps in
// the order {2u: k 2c..2c+1, 2u: k 2c+8..2c+9, 2u+1: ..., 2u+1: ...}; b_pairs gives the x
// operands of the same k positions from the chunk's 4 words.

// The per-k-step hooks (moe/gemm.cuh) of a format whose scale needs nothing worked out once per
// k-step: the scale as it is, one path.
template <typename F>
struct ScaleAsIs {
  template <typename S>
  __device__ static bool fast(S) {
    return true;
  }
  template <bool kFast, typename S>
  __device__ static S prepare(S s) {
    return s;
  }
  template <bool kFast, typename S>
  __device__ static void a_pairs_prepared(const uint4& w, S s, int u, uint32_t (&a)[4]) {
    F::a_pairs(w, s, u, a);
  }
};

template <typename T>
struct DenseFormat : ScaleAsIs<DenseFormat<T>> {
  using Act = T;
  static constexpr int kStepBytes = 64;  // between a row's k-steps (rows as stored)
  static constexpr int kChunks = 1;
  static constexpr int kXBytesPerWeightByte = 1;
  static constexpr int kXPitchMod = 64;
  static constexpr bool kFlipHalves = false;
  static constexpr StageScales kStageScales = StageScales::kNone;
  struct Scale {};
  __device__ static Scale neutral_scale() { return {}; }
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
  // Lanes c of rows r, r+1 read chunks 4s + c: the odd row's half moves by 4 chunks, into the
  // next k-step's (not step-local).
  static constexpr bool kStepLocalSwizzle = false;
  __device__ static int swizzle(int row, int chunk) { return chunk ^ ((row & 1) << 2); }
};

struct Fp8Format : ScaleAsIs<Fp8Format> {
  using Act = __nv_bfloat16;
  static constexpr int kStepBytes = 64;
  static constexpr int kChunks = 2;
  static constexpr int kXBytesPerWeightByte = 2;
  static constexpr int kXPitchMod = 16;
  static constexpr bool kFlipHalves = false;
  static constexpr StageScales kStageScales = StageScales::kRowBlocks;
  using Scale = float;
  __device__ static Scale neutral_scale() { return 0.0f; }
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
  // Lanes c of rows r, r+1 read chunks 8s + 2c + u: the odd row moves to the other parity,
  // within the k-step's chunks.
  static constexpr bool kStepLocalSwizzle = true;
  __device__ static int swizzle(int row, int chunk) { return chunk ^ (row & 1); }
};

// MXFP4 over words of either layout (src/mxfp4_layout.h): Words::bits<Q> places a pair of a
// word's elements into a bf16x2 and Words::b_pairs pairs the x elements to match; everything
// else is the same for both.
template <typename Words>
struct Mxfp4Codes {
  using Act = __nv_bfloat16;
  static constexpr int kStepBytes = 64;
  static constexpr int kChunks = 4;
  static constexpr int kXBytesPerWeightByte = 4;
  static constexpr int kXPitchMod = 32;
  static constexpr bool kFlipHalves = true;
  static constexpr StageScales kStageScales = StageScales::kPerRow;  // one E8M0 byte per 16 bytes
  using Scale = uint32_t;  // the E8M0 byte
  __device__ static Scale neutral_scale() { return 127u; }
  __device__ static int64_t scale_row(const GemmArgs& a, int64_t e, int64_t n) {
    return e * a.s_expert + n * a.s_row;
  }
  // The exponent of the lane's block of 32 elements at k0.
  __device__ static Scale load_scale(const GemmArgs& a, int64_t row, int k0, bool ok) {
    const uint32_t block = static_cast<uint32_t>(k0) >> 5;  // k0 >= 0: a shift, not a divide
    return ok ? __ldg(static_cast<const uint8_t*>(a.scales) + row + block) : 0u;
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
  // value * 2^-126 * 2^(scale - 1) = value * 2^(scale - 127): 2^(scale - 1) is a normal bf16
  // up to scale 128 (weights below 2^2: every real checkpoint), the multiplier of one multiply
  // per pair; beyond it the product goes through 2^126 first.
  __device__ static uint32_t small_multiplier(Scale scale) {
    const uint32_t m = (scale + 126u) << 7;
    return m | (m << 16);
  }
  __device__ static uint32_t word_of(const uint4& w, int u) {
    return u == 0 ? w.x : u == 1 ? w.y : u == 2 ? w.z : w.w;
  }
  // a_pairs for a scale <= 128 given as small_multiplier(scale).
  __device__ static void a_pairs_small(const uint4& w, uint32_t multiplier, int u,
                                       uint32_t (&a)[4]) {
    const uint32_t word = word_of(w, u);
    a[0] = times(Words::template bits<0>(word), multiplier);
    a[1] = times(Words::template bits<1>(word), multiplier);
    a[2] = times(Words::template bits<2>(word), multiplier);
    a[3] = times(Words::template bits<3>(word), multiplier);
  }
  __device__ static void a_pairs(const uint4& w, Scale scale, int u, uint32_t (&a)[4]) {
    if (scale <= 128u) {
      a_pairs_small(w, small_multiplier(scale), u, a);
      return;
    }
    const uint32_t word = word_of(w, u);
    a[0] = Words::template bits<0>(word);
    a[1] = Words::template bits<1>(word);
    a[2] = Words::template bits<2>(word);
    a[3] = Words::template bits<3>(word);
    const uint32_t big = 0x7E807E80u;  // 2^126
    const uint32_t m = scale << 7;
    const uint32_t m2 = m | (m << 16);
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = times(times(a[i], big), m2);
  }
  // Lanes c of rows r, r+1 read chunks 4c + u: chunks 8..15 move by 2 within their bank group
  // and the odd row to the other parity, all within the k-step's 16 chunks.
  static constexpr bool kStepLocalSwizzle = true;
  __device__ static int swizzle(int row, int chunk) {
    return chunk ^ (((chunk >> 3) & 1) << 1) ^ (row & 1);
  }
  // Per k-step, once per weight row (moe/gemm.cuh): a scale <= 128 (every real checkpoint's)
  // becomes its multiplier, so each pair costs its bits and one multiply; a larger one stays
  // the scale for the two-multiply path.
  __device__ static bool fast(Scale s) { return s <= 128u; }
  template <bool kFast>
  __device__ static uint32_t prepare(Scale s) { return kFast ? small_multiplier(s) : s; }
  template <bool kFast>
  __device__ static void a_pairs_prepared(const uint4& w, uint32_t p, int u, uint32_t (&a)[4]) {
    if constexpr (kFast) {
      a_pairs_small(w, p, u, a);
    } else {
      a_pairs(w, p, u, a);
    }
  }
};

// Checkpoint words (GPT-OSS's nibbles as stored): two shifts and two masks per pair of elements
// q, q + 4, so the x elements are paired the same way (a byte permute per pair).
struct Mxfp4Format : Mxfp4Codes<Mxfp4Format> {
  template <int Q>
  __device__ static uint32_t bits(uint32_t word) {
    return mxfp4::checkpoint_pair<Q>(word);
  }
  __device__ static uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
    return r;
  }
  __device__ static void b_pairs(const uint4& x, uint32_t (&b)[4]) {
    b[0] = prmt(x.x, x.z, 0x5410u);
    b[1] = prmt(x.x, x.z, 0x7632u);
    b[2] = prmt(x.y, x.w, 0x5410u);
    b[3] = prmt(x.y, x.w, 0x7632u);
  }
};

// mma-layout words: 9 integer instructions for a word's four pairs instead of 16, and each pair
// is elements 2q, 2q + 1: the x words go to the mma as they are.
struct Mxfp4MmaFormat : Mxfp4Codes<Mxfp4MmaFormat> {
  template <int Q>
  __device__ static uint32_t bits(uint32_t word) {
    return mxfp4::mma_pair<Q>(word);
  }
  __device__ static void b_pairs(const uint4& x, uint32_t (&b)[4]) {
    b[0] = x.x;
    b[1] = x.y;
    b[2] = x.z;
    b[3] = x.w;
  }
};

// The mma layout's words in 16-row tiles, k-step-major (MoeMxfp4Layout::kMmaTiled): a warp's
// 16 rows of a k-step are one contiguous KB, where rows as stored put each row's 64 bytes one
// row apart (1440 bytes for gpt-oss-20b), a DRAM page touched per 64-128 bytes. The scales of
// a k-step's 16 rows are 64 contiguous bytes likewise.
struct Mxfp4TiledFormat : Mxfp4MmaFormat {
  static constexpr int kStepBytes = mxfp4::kTileRows * 64;
  __device__ static int64_t scale_row(const GemmArgs& a, int64_t e, int64_t n) {
    return e * a.s_expert + mxfp4::tiled_scale_offset(a.s_tile, n, 0);
  }
  // k0 / 32 = 4 step + c: the lane's block of the step, at 64 bytes a step.
  __device__ static Scale load_scale(const GemmArgs& a, int64_t row, int k0, bool ok) {
    const uint32_t block = static_cast<uint32_t>(k0) >> 5;
    return ok ? __ldg(static_cast<const uint8_t*>(a.scales) + row + (block >> 2) * 64 +
                      (block & 3u))
              : 0u;
  }
};

}  // namespace moelora::cuda::moe
