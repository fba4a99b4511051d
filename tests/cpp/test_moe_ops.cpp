// The MoE layer's ops through the C++ API (moelora/moe.h) on host tensors: routing into expert
// blocks, the expert GEMM over MXFP4 and FP8 bytes read back exactly, the gated epilogue on
// whole numbers, and argument errors. The numerics against float64 are in tests/python.
#include <cmath>
#include <cstdint>
#include <vector>

#include "moelora/error.h"
#include "moelora/moe.h"
#include "test_harness.h"

using namespace moelora;

namespace {

template <typename T>
TensorRef ref(std::vector<T>& v, DType dtype, std::initializer_list<int64_t> shape) {
  return make_tensor_ref(v.data(), dtype, shape);
}

struct Blocks {
  std::vector<int32_t> pairs, experts, count{0}, counts;
};

// moe_route of `logits` [T, E] into blocks of block_m rows.
Blocks route(std::vector<float>& logits, int64_t tokens, int32_t experts, int32_t top_k,
             int32_t block_m, std::vector<int32_t>& ids, std::vector<float>& weights) {
  const int64_t max_blocks = moe_route_max_blocks(tokens * top_k, experts, block_m);
  Blocks b;
  b.pairs.assign(static_cast<size_t>(max_blocks * block_m), 99);
  b.experts.assign(static_cast<size_t>(max_blocks), 99);
  b.counts.assign(static_cast<size_t>(experts), 99);
  ids.assign(static_cast<size_t>(tokens * top_k), 99);
  weights.assign(static_cast<size_t>(tokens * top_k), 99.0f);
  moe_route(ref(logits, DType::kFloat32, {tokens, experts}), top_k, MoeRouting::kTopkSoftmax,
            true, block_m, ref(ids, DType::kInt32, {tokens, top_k}),
            ref(weights, DType::kFloat32, {tokens, top_k}),
            ref(b.pairs, DType::kInt32, {max_blocks * block_m}),
            ref(b.experts, DType::kInt32, {max_blocks}), ref(b.count, DType::kInt32, {1}),
            ref(b.counts, DType::kInt32, {experts}), nullptr);
  return b;
}

}  // namespace

TEST_CASE("route_groups_pairs_by_expert_into_blocks") {
  // token 0 -> experts 2, 0; token 1 -> 2, 1; token 2 -> 2 (tie with 3 goes to 2), 3
  std::vector<float> logits = {5, 0, 9, 1, 0, 4, 8, 2, 0, 0, 7, 7};
  std::vector<int32_t> ids;
  std::vector<float> weights;
  const Blocks b = route(logits, 3, 4, 2, 2, ids, weights);
  CHECK((ids == std::vector<int32_t>{2, 0, 2, 1, 2, 3}));
  CHECK(std::fabs(weights[4] - 0.5f) < 1e-6f && std::fabs(weights[5] - 0.5f) < 1e-6f);
  CHECK(std::fabs(weights[0] - 1.0f / (1.0f + std::exp(-4.0f))) < 1e-6f);
  CHECK_EQ(b.count[0], 5);  // experts 0, 1, 3: one block each; expert 2: three pairs, two blocks
  CHECK((b.counts == std::vector<int32_t>{1, 1, 3, 1}));
  CHECK((std::vector<int32_t>(b.experts.begin(), b.experts.begin() + 5) ==
         std::vector<int32_t>{0, 1, 2, 2, 3}));
  CHECK((std::vector<int32_t>(b.pairs.begin(), b.pairs.begin() + 10) ==
         std::vector<int32_t>{1, -1, 3, -1, 0, 2, 4, -1, 5, -1}));
  for (size_t i = 10; i < b.pairs.size(); ++i) CHECK_EQ(b.pairs[i], -1);
  for (size_t i = 5; i < b.experts.size(); ++i) CHECK_EQ(b.experts[i], -1);
}

TEST_CASE("expert_gemm_reads_mxfp4_and_fp8_bytes_exactly") {
  // One expert, N = 2 rows, K = 32: one-hot inputs read the weights back.
  const int64_t k = 32;
  std::vector<float> x(static_cast<size_t>(k * k), 0.0f);
  for (int64_t i = 0; i < k; ++i) x[static_cast<size_t>(i * k + i)] = 1.0f;
  std::vector<int32_t> pairs(static_cast<size_t>(k)), experts{0}, count{1};
  for (int32_t i = 0; i < k; ++i) pairs[static_cast<size_t>(i)] = i;
  std::vector<uint8_t> blocks(2 * 16), scales{127, 129};
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = static_cast<uint8_t>(i * 37 + 11);
  std::vector<float> out(static_cast<size_t>(k * 2), NAN);
  MoeExpertWeights w;
  w.format = MoeWeightFormat::kMxfp4;
  w.weight = ref(blocks, DType::kUInt8, {1, 2, 1, 16});
  w.scales = ref(scales, DType::kUInt8, {1, 2, 1});
  moe_expert_gemm(ref(x, DType::kFloat32, {k, k}), 1, w, ref(pairs, DType::kInt32, {k}),
                  ref(experts, DType::kInt32, {1}), ref(count, DType::kInt32, {1}),
                  static_cast<int32_t>(k), MoeEpilogue{}, ref(out, DType::kFloat32, {k, 2}),
                  nullptr);
  const float e2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int64_t n = 0; n < 2; ++n) {
    for (int64_t i = 0; i < k; ++i) {
      const uint8_t byte = blocks[static_cast<size_t>(n * 16 + i / 2)];
      const int code = i % 2 ? byte >> 4 : byte & 0xF;
      const float want = (code & 8 ? -1.0f : 1.0f) * e2m1[code & 7] * (n == 0 ? 1.0f : 4.0f);
      CHECK_EQ(out[static_cast<size_t>(i * 2 + n)], want);
    }
  }
  // FP8 e4m3: 0x38 = 1.0, 0xC0 = -2.0, 0x01 = 2^-9 (subnormal), times block scales 0.5 / 3
  std::vector<uint8_t> fp8(static_cast<size_t>(2 * k), 0x38);
  fp8[1] = 0xC0;
  fp8[static_cast<size_t>(k + 2)] = 0x01;
  std::vector<float> fp8_scales{0.5f, 3.0f};
  w.format = MoeWeightFormat::kFp8Block;
  w.weight = ref(fp8, DType::kUInt8, {1, 2, k});
  w.scales = ref(fp8_scales, DType::kFloat32, {1, 2, 1});
  w.block_n = 1;
  w.block_k = 32;
  moe_expert_gemm(ref(x, DType::kFloat32, {k, k}), 1, w, ref(pairs, DType::kInt32, {k}),
                  ref(experts, DType::kInt32, {1}), ref(count, DType::kInt32, {1}),
                  static_cast<int32_t>(k), MoeEpilogue{}, ref(out, DType::kFloat32, {k, 2}),
                  nullptr);
  CHECK_EQ(out[0], 0.5f);
  CHECK_EQ(out[2], -1.0f);
  CHECK_EQ(out[5], 3.0f * std::ldexp(1.0f, -9));
  CHECK_EQ(out[7], 3.0f);
}

TEST_CASE("gated_epilogue_on_whole_numbers") {
  // x = [1, 2], gate row = [1, 1] (-> 3), up row = [2, 0] (-> 2) + bias 1: silu(3) * 3;
  // GPT-OSS with limit 2.5: gate 2.5, up 2.5: (2.5 + 1) * 2.5 * sigmoid(2.5 * alpha)
  std::vector<float> x{1, 2}, weight{1, 1, 2, 0}, bias{0, 1}, out{NAN};
  std::vector<int32_t> pairs{0}, experts{0}, count{1};
  MoeExpertWeights w;
  w.weight = ref(weight, DType::kFloat32, {1, 2, 2});
  w.bias = ref(bias, DType::kFloat32, {1, 2});
  MoeEpilogue epilogue;
  epilogue.activation = MoeActivation::kSilu;
  auto run = [&] {
    moe_expert_gemm(ref(x, DType::kFloat32, {1, 2}), 1, w, ref(pairs, DType::kInt32, {1}),
                    ref(experts, DType::kInt32, {1}), ref(count, DType::kInt32, {1}), 1,
                    epilogue, ref(out, DType::kFloat32, {1, 1}), nullptr);
  };
  run();
  CHECK(std::fabs(out[0] - 3.0f / (1.0f + std::exp(-3.0f)) * 3.0f) < 1e-5f);
  epilogue.activation = MoeActivation::kGptOss;
  epilogue.swiglu_alpha = 1.5f;
  epilogue.swiglu_limit = 2.5f;
  run();
  CHECK(std::fabs(out[0] - 3.5f * 2.5f / (1.0f + std::exp(-3.75f))) < 1e-5f);
}

TEST_CASE("bad_arguments_are_invalid_argument") {
  std::vector<float> logits(8, 0.0f);
  std::vector<int32_t> ids;
  std::vector<float> weights;
  CHECK_THROWS_AS(route(logits, 2, 4, 5, 2, ids, weights), InvalidArgument);  // top_k > E
  CHECK_THROWS_AS(moe_route_max_blocks(4, 0, 8), InvalidArgument);
  std::vector<float> x{1, 2}, weight{1, 1}, out{0};
  std::vector<int32_t> pairs{0}, experts{3}, count{1};
  MoeExpertWeights w;
  w.weight = ref(weight, DType::kFloat32, {1, 1, 2});
  // block_expert[0] = 3 with one expert
  CHECK_THROWS_AS(moe_expert_gemm(ref(x, DType::kFloat32, {1, 2}), 1, w,
                                  ref(pairs, DType::kInt32, {1}),
                                  ref(experts, DType::kInt32, {1}),
                                  ref(count, DType::kInt32, {1}), 1, MoeEpilogue{},
                                  ref(out, DType::kFloat32, {1, 1}), nullptr),
                  InvalidArgument);
}

MOELORA_TEST_MAIN()
