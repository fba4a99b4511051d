// The MXFP4 "mma" word layout (MoeMxfp4Layout::kMma, moelora/moe.h), shared by the CPU
// reference, the CUDA kernels and the Python repack (through the _C module's table).
//
// A 16-byte block is 4 little-endian 32-bit words; word u holds elements 8u..8u+7, element i as
// nibble i in the checkpoint layout: bit 0 mantissa m, bits 1-2 exponent e0 e1, bit 3 sign s.
// The tensor-core kernels take elements 2q and 2q + 1 of a word as the two halves of a bf16x2
// of value * 2^-126 (m -> bit 6, e0 -> 7, e1 -> 8, s -> 15 of each half): the pairs of the
// activations' own bf16x2 words, so the activations go to the mma as they are loaded. The mma
// layout permutes the bits of each word once, at load, so that the four pairs of a word cost 9
// integer instructions (from checkpoint words: 16, and the activations then need pairing):
//   pair 0 (elements 0, 1): rotl(w, 6) & 0x81C081C0
//   pair 1 (elements 2, 3): (rotl(w, 4) & 0x81808180) | (rotl(w, 28) & 0x00400040)
//   pair 2 (elements 4, 5): rotl(w, 26) & 0x81C081C0
//   pair 3 (elements 6, 7): w & 0x81C081C0                (the bits already in place)
// (Which pair takes which rotation is the choice with the fewest distinct bit displacements,
// kShifts: the repack's shift-and-mask passes.) The permutation only moves bits within a word,
// so slices of whole 16-byte blocks (the tensor-parallel cut along K, expert and row slices)
// keep the layout. The tiled layout (end of this file) also moves whole blocks: tiles of 16
// rows stored k-step-major, so that the tiled kernel's warps read contiguous memory.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOELORA_MXFP4_HD __host__ __device__ __forceinline__
#else
#define MOELORA_MXFP4_HD inline
#endif

namespace moelora::mxfp4 {

// kMmaPosition[i][b]: the bit of the mma word that holds bit b (m, e0, e1, s) of element i.
inline constexpr int kMmaPosition[8][4] = {
    {0, 1, 2, 9},      {16, 17, 18, 25},  {10, 3, 4, 11},   {26, 19, 20, 27},
    {12, 13, 14, 21},  {28, 29, 30, 5},   {6, 7, 8, 15},    {22, 23, 24, 31},
};

// The checkpoint bits that move `shift` places up (down when negative) into the mma word.
constexpr uint32_t moved_by(int shift) {
  uint32_t mask = 0;
  for (int i = 0; i < 8; ++i) {
    for (int b = 0; b < 4; ++b) {
      if (kMmaPosition[i][b] - (4 * i + b) == shift) mask |= 1u << (4 * i + b);
    }
  }
  return mask;
}

// Every bit of the mma word is the destination of exactly one checkpoint bit.
constexpr bool is_permutation() {
  uint32_t seen = 0;
  for (int i = 0; i < 8; ++i) {
    for (int b = 0; b < 4; ++b) {
      const int p = kMmaPosition[i][b];
      if (p < 0 || p > 31 || (seen >> p) & 1u) return false;
      seen |= 1u << p;
    }
  }
  return seen == 0xFFFFFFFFu;
}
static_assert(is_permutation(), "kMmaPosition must place the 32 bits on distinct positions");

// The displacements of the permutation: bits that move by the same amount move together.
inline constexpr int kShifts[11] = {-18, -12, -6, -4, 0, 2, 6, 8, 12, 14, 18};

constexpr bool shifts_cover_every_bit() {
  uint32_t all = 0;
  for (int s : kShifts) all |= moved_by(s);
  return all == 0xFFFFFFFFu;
}
static_assert(shifts_cover_every_bit(), "kShifts must hold every displacement of kMmaPosition");

template <int Shift>
MOELORA_MXFP4_HD uint32_t move_to_mma(uint32_t w) {
  constexpr uint32_t mask = moved_by(Shift);
  if constexpr (Shift >= 0) {
    return (w & mask) << Shift;
  } else {
    return (w & mask) >> -Shift;
  }
}

template <int Shift>
MOELORA_MXFP4_HD uint32_t move_from_mma(uint32_t w) {
  constexpr uint32_t mask = moved_by(Shift);
  if constexpr (Shift >= 0) {
    return (w >> Shift) & mask;
  } else {
    return (w << -Shift) & mask;
  }
}

// A checkpoint word in the mma layout, and back (kShifts spelled out: one shift and mask each).
MOELORA_MXFP4_HD uint32_t to_mma(uint32_t w) {
  return move_to_mma<-18>(w) | move_to_mma<-12>(w) | move_to_mma<-6>(w) | move_to_mma<-4>(w) |
         move_to_mma<0>(w) | move_to_mma<2>(w) | move_to_mma<6>(w) | move_to_mma<8>(w) |
         move_to_mma<12>(w) | move_to_mma<14>(w) | move_to_mma<18>(w);
}

MOELORA_MXFP4_HD uint32_t from_mma(uint32_t w) {
  return move_from_mma<-18>(w) | move_from_mma<-12>(w) | move_from_mma<-6>(w) |
         move_from_mma<-4>(w) | move_from_mma<0>(w) | move_from_mma<2>(w) |
         move_from_mma<6>(w) | move_from_mma<8>(w) | move_from_mma<12>(w) |
         move_from_mma<14>(w) | move_from_mma<18>(w);
}

// The 4-bit code of element i (0..7) of a word in either layout.
MOELORA_MXFP4_HD uint32_t code_of_checkpoint(uint32_t w, int i) { return (w >> (4 * i)) & 0xFu; }
MOELORA_MXFP4_HD uint32_t code_of_mma(uint32_t w, int i) {
  return code_of_checkpoint(from_mma(w), i);
}

MOELORA_MXFP4_HD uint32_t rotl(uint32_t w, int r) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_l(w, w, r);
#else
  return r == 0 ? w : (w << r) | (w >> (32 - r));
#endif
}

// Elements q and q + 4 of a word as a bf16x2 of value * 2^-126: sign to bit 15, exponent and
// mantissa to bits 6-8 of each half (the tensor-core kernels multiply by 2^(scale - 1) next).
// Checkpoint words: both halves' exponent/mantissa bits move by one shift, the signs by another.
template <int Q>
MOELORA_MXFP4_HD uint32_t checkpoint_pair(uint32_t w) {
  constexpr int kEm = 6 - 4 * Q;  // shift of the exponent/mantissa bits (right when < 0)
  constexpr int kSign = 12 - 4 * Q;
  uint32_t em;
  if constexpr (kEm >= 0) {
    em = w << kEm;
  } else {
    em = w >> -kEm;
  }
  return (em & 0x01C001C0u) | ((w << kSign) & 0x80008000u);
}

// Elements 2Q and 2Q + 1 of an mma word as a bf16x2 of value * 2^-126 (the halves of
// checkpoint_pair's form): one rotation (pair 3: none; pair 1: two) puts all four bits of both
// halves in place.
template <int Q>
MOELORA_MXFP4_HD uint32_t mma_pair(uint32_t w) {
  constexpr uint32_t kField = 0x81C081C0u;
  if constexpr (Q == 0) {
    return rotl(w, 6) & kField;
  } else if constexpr (Q == 1) {
    return (rotl(w, 4) & 0x81808180u) | (rotl(w, 28) & 0x00400040u);
  } else if constexpr (Q == 2) {
    return rotl(w, 26) & kField;
  } else {
    return w & kField;
  }
}

// The tiled layout (MoeMxfp4Layout::kMmaTiled): the mma layout's words in tiles of kTileRows
// rows, k-step-major (a k-step being kStepBlocks blocks of 16 bytes a row), so that one k-step
// of a tile is kTileRows * 64 contiguous bytes. Offsets within an expert, given the stride of
// a tile (the weight's or the scales' dimension 1).
inline constexpr int kTileRows = 16;
inline constexpr int kStepBlocks = 4;

MOELORA_MXFP4_HD int64_t tiled_block_offset(int64_t tile_stride, int64_t n, int64_t block) {
  return (n / kTileRows) * tile_stride + (block / kStepBlocks) * (kTileRows * kStepBlocks * 16) +
         (n % kTileRows) * (kStepBlocks * 16) + (block % kStepBlocks) * 16;
}

MOELORA_MXFP4_HD int64_t tiled_scale_offset(int64_t tile_stride, int64_t n, int64_t block) {
  return (n / kTileRows) * tile_stride + (block / kStepBlocks) * (kTileRows * kStepBlocks) +
         (n % kTileRows) * kStepBlocks + block % kStepBlocks;
}

}  // namespace moelora::mxfp4
