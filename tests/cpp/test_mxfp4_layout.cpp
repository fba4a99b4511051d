// Tests of the MXFP4 mma word layout (src/mxfp4_layout.h): the grouped-shift permutation
// against a bit-by-bit walk of the position table, its inverse, the per-element codes, and the
// tensor-core kernels' pair extraction from mma and checkpoint words against a bf16x2 built
// from the two elements' codes, and the tiled layout's offsets.
#include <cstdint>
#include <random>
#include <vector>

#include "mxfp4_layout.h"
#include "test_harness.h"

using namespace moelora;

namespace {

// to_mma one bit at a time, straight from the table.
uint32_t to_mma_by_table(uint32_t w) {
  uint32_t out = 0;
  for (int i = 0; i < 8; ++i) {
    for (int b = 0; b < 4; ++b) {
      if ((w >> (4 * i + b)) & 1u) out |= 1u << mxfp4::kMmaPosition[i][b];
    }
  }
  return out;
}

// Every single-bit word (the maps are linear over bits, so these decide them) and random ones.
std::vector<uint32_t> test_words() {
  std::vector<uint32_t> words{0u, 0xFFFFFFFFu};
  for (int b = 0; b < 32; ++b) words.push_back(1u << b);
  std::mt19937 gen(7);
  for (int i = 0; i < 100000; ++i) words.push_back(static_cast<uint32_t>(gen()));
  return words;
}

// Elements lo and hi of checkpoint word w as the kernels' bf16x2 of value * 2^-126: each code's
// m, e0, e1 to bits 6, 7, 8 of its half and s to bit 15.
uint32_t pair_of_elements(uint32_t w, int lo, int hi) {
  auto half = [](uint32_t code) { return ((code & 0x7u) << 6) | ((code & 0x8u) << 12); };
  return half(mxfp4::code_of_checkpoint(w, lo)) | (half(mxfp4::code_of_checkpoint(w, hi)) << 16);
}

}  // namespace

TEST_CASE("mxfp4_mma_permutation_matches_its_table_and_inverts") {
  for (const uint32_t w : test_words()) {
    const uint32_t m = mxfp4::to_mma(w);
    CHECK_EQ(m, to_mma_by_table(w));
    CHECK_EQ(mxfp4::from_mma(m), w);
    for (int i = 0; i < 8; ++i) {
      CHECK_EQ(mxfp4::code_of_mma(m, i), mxfp4::code_of_checkpoint(w, i));
    }
  }
}

TEST_CASE("mxfp4_pairs_are_the_elements_the_activations_pair_with") {
  for (const uint32_t w : test_words()) {
    const uint32_t m = mxfp4::to_mma(w);
    // mma words: elements 2q, 2q + 1 (the halves of the activations' bf16x2 word q)
    CHECK_EQ(mxfp4::mma_pair<0>(m), pair_of_elements(w, 0, 1));
    CHECK_EQ(mxfp4::mma_pair<1>(m), pair_of_elements(w, 2, 3));
    CHECK_EQ(mxfp4::mma_pair<2>(m), pair_of_elements(w, 4, 5));
    CHECK_EQ(mxfp4::mma_pair<3>(m), pair_of_elements(w, 6, 7));
    // checkpoint words: elements q, q + 4 (the activations are paired to match)
    CHECK_EQ(mxfp4::checkpoint_pair<0>(w), pair_of_elements(w, 0, 4));
    CHECK_EQ(mxfp4::checkpoint_pair<1>(w), pair_of_elements(w, 1, 5));
    CHECK_EQ(mxfp4::checkpoint_pair<2>(w), pair_of_elements(w, 2, 6));
    CHECK_EQ(mxfp4::checkpoint_pair<3>(w), pair_of_elements(w, 3, 7));
  }
}

MOELORA_TEST_MAIN()

// The tiled layout's offsets visit every byte and scale of a stack once, a k-step of a 16-row
// tile being one contiguous KB of blocks and 64 bytes of scales.
TEST_CASE("mxfp4_tiles_place_every_block_and_scale_once") {
  constexpr int64_t kRows = 48, kBlocks = 27;  // 3 tiles; 7 k-steps, the last one 3/4 padding
  constexpr int64_t kSteps = (kBlocks + mxfp4::kStepBlocks - 1) / mxfp4::kStepBlocks;
  constexpr int64_t kTileBytes = kSteps * mxfp4::kTileRows * mxfp4::kStepBlocks * 16;
  constexpr int64_t kTileScales = kSteps * mxfp4::kTileRows * mxfp4::kStepBlocks;
  std::vector<int> block_seen(static_cast<size_t>(kRows / 16 * kTileBytes / 16), 0);
  std::vector<int> scale_seen(static_cast<size_t>(kRows / 16 * kTileScales), 0);
  for (int64_t n = 0; n < kRows; ++n) {
    for (int64_t g = 0; g < kBlocks; ++g) {
      const int64_t at = mxfp4::tiled_block_offset(kTileBytes, n, g);
      CHECK_EQ(at % 16, 0);
      ++block_seen[static_cast<size_t>(at / 16)];
      ++scale_seen[static_cast<size_t>(mxfp4::tiled_scale_offset(kTileScales, n, g))];
      // the 16 rows of one k-step share one KB
      CHECK_EQ(at / 1024, (n / 16) * kSteps + g / 4);
    }
  }
  int64_t blocks = 0, scales = 0;
  for (const int c : block_seen) {
    CHECK(c <= 1);
    blocks += c;
  }
  for (const int c : scale_seen) {
    CHECK(c <= 1);
    scales += c;
  }
  CHECK_EQ(blocks, kRows * kBlocks);
  CHECK_EQ(scales, kRows * kBlocks);
}
