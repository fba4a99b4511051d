// Native timing of one MoE layer's LoRA delta (w13 and w2, align included when the step is
// grouped) on the GPU, in the form and kernels the plan picks for the shape (moelora/plan.h): no
// Python, no torch. Random bf16 LoRA rows in one device arena per site, a row table per site,
// CUDA events over many launches, median printed as one JSON line with the plan.
//   bench_kernels [tokens=1] [adapters=4] [rank=16] [hidden=2880] [inter=2880] [experts=32]
//                 [top_k=4] [iters=200]
// A CPU-only build prints a note and exits 0.
#include <algorithm>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "moelora/ops.h"
#include "moelora/plan.h"

#ifdef MOELORA_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda_check.h"

namespace {

using moelora::DType;
using moelora::DeviceKind;
using moelora::LoraSiteView;
using moelora::TensorRef;

template <typename T>
T* device_copy(const std::vector<T>& host) {
  T* ptr = nullptr;
  MOELORA_CUDA_CHECK(cudaMalloc(&ptr, std::max<size_t>(1, host.size()) * sizeof(T)));
  MOELORA_CUDA_CHECK(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return ptr;
}

TensorRef ref(void* data, DType dtype, std::initializer_list<int64_t> shape) {
  return moelora::make_tensor_ref(data, dtype, shape, DeviceKind::kCUDA, 0);
}

// A site whose (slot, expert) rows sit back to back: A rows [rank][in], then B^T rows [rank][out].
struct Site {
  LoraSiteView view;
  Site(int slots, int experts, int rank, int64_t in_dim, int64_t out_dim, std::mt19937& rng) {
    const int64_t group_bytes = int64_t{rank} * (in_dim + out_dim) * 2;
    std::vector<uint16_t> values(static_cast<size_t>(slots * experts * group_bytes / 2));
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (auto& v : values) {
      float f = normal(rng);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      v = static_cast<uint16_t>(bits >> 16);  // bf16 by truncation: fine for timing
    }
    std::vector<int64_t> table(static_cast<size_t>(slots) * experts * 2 * rank);
    for (int s = 0; s < slots; ++s) {
      for (int e = 0; e < experts; ++e) {
        const int64_t base = (int64_t{s} * experts + e) * group_bytes;
        for (int r = 0; r < rank; ++r) {
          table[((int64_t{s} * experts + e) * 2 + 0) * rank + r] = base + r * in_dim * 2;
          table[((int64_t{s} * experts + e) * 2 + 1) * rank + r] =
              base + int64_t{rank} * in_dim * 2 + r * out_dim * 2;
        }
      }
    }
    view.arena = reinterpret_cast<const std::byte*>(device_copy(values));
    view.row_offsets = device_copy(table);
    view.slot_stride = int64_t{experts} * 2 * rank;
    view.ranks = device_copy(std::vector<int32_t>(static_cast<size_t>(slots), rank));
    view.rank_slot_stride = 1;
    view.num_slots = slots;
    view.num_experts = experts;
    view.max_rank = rank;
    view.in_dim = in_dim;
    view.out_dim = out_dim;
    view.dtype = DType::kBFloat16;
  }
};

}  // namespace

int main(int argc, char** argv) {
  auto arg = [&](int i, long fallback) { return argc > i ? std::atol(argv[i]) : fallback; };
  const int64_t tokens = arg(1, 1);
  const int adapters = static_cast<int>(arg(2, 4));
  const int rank = static_cast<int>(arg(3, 16));
  const int64_t hidden = arg(4, 2880), inter = arg(5, 2880);
  const int experts = static_cast<int>(arg(6, 32)), top_k = static_cast<int>(arg(7, 4));
  const int iters = static_cast<int>(arg(8, 200));
  std::mt19937 rng(1234);

  Site gate(adapters, experts, rank, hidden, inter, rng);
  Site up(adapters, experts, rank, hidden, inter, rng);
  Site down(adapters, experts, rank, inter, hidden, rng);
  const int64_t pairs = tokens * top_k;
  std::vector<int32_t> ids(static_cast<size_t>(pairs)), slots(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    slots[t] = static_cast<int32_t>(rng() % adapters);
    std::vector<int32_t> perm(experts);
    for (int e = 0; e < experts; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int k = 0; k < top_k; ++k) ids[t * top_k + k] = perm[k];
  }
  std::vector<float> weights(static_cast<size_t>(pairs), 0.25f);
  moelora::LoraStep step;
  step.num_pairs = pairs;
  step.num_experts = experts;
  step.num_adapters = adapters;
  step.dtype = DType::kBFloat16;
  const moelora::LoraPlan plan =
      moelora::plan_lora(step, moelora::device_props(DeviceKind::kCUDA, -1));
  const int32_t block_m = plan.block_m;
  const int64_t max_blocks = moelora::moe_lora_align_max_blocks(pairs, experts, adapters, block_m);
  int32_t *sorted = nullptr, *block_slot = nullptr, *block_expert = nullptr, *num_blocks = nullptr;
  MOELORA_CUDA_CHECK(cudaMalloc(&sorted, max_blocks * block_m * 4));
  MOELORA_CUDA_CHECK(cudaMalloc(&block_slot, max_blocks * 4));
  MOELORA_CUDA_CHECK(cudaMalloc(&block_expert, max_blocks * 4));
  MOELORA_CUDA_CHECK(cudaMalloc(&num_blocks, 4));
  void *x = nullptr, *h = nullptr, *h13 = nullptr, *y = nullptr;
  MOELORA_CUDA_CHECK(cudaMalloc(&x, tokens * hidden * 2));
  MOELORA_CUDA_CHECK(cudaMalloc(&h, pairs * inter * 2));
  MOELORA_CUDA_CHECK(cudaMalloc(&h13, pairs * 2 * inter * 2));
  MOELORA_CUDA_CHECK(cudaMalloc(&y, pairs * hidden * 2));
  MOELORA_CUDA_CHECK(cudaMemset(x, 0x3c, tokens * hidden * 2));  // small non-zero bf16 values
  MOELORA_CUDA_CHECK(cudaMemset(h, 0x3c, pairs * inter * 2));
  MOELORA_CUDA_CHECK(cudaMemset(h13, 0, pairs * 2 * inter * 2));
  MOELORA_CUDA_CHECK(cudaMemset(y, 0, pairs * hidden * 2));
  int32_t* d_ids = device_copy(ids);
  int32_t* d_slots = device_copy(slots);
  float* d_weights = device_copy(weights);

  const TensorRef ids_ref = ref(d_ids, DType::kInt32, {tokens, top_k});
  const TensorRef slot_ref = ref(d_slots, DType::kInt32, {tokens});
  const TensorRef sorted_ref = ref(sorted, DType::kInt32, {max_blocks * block_m});
  const TensorRef bs_ref = ref(block_slot, DType::kInt32, {max_blocks});
  const TensorRef be_ref = ref(block_expert, DType::kInt32, {max_blocks});
  const TensorRef nb_ref = ref(num_blocks, DType::kInt32, {1});
  const TensorRef w_ref = ref(d_weights, DType::kFloat32, {pairs});
  const TensorRef x_ref = ref(x, DType::kBFloat16, {tokens, hidden});
  const TensorRef h_ref = ref(h, DType::kBFloat16, {pairs, inter});
  const TensorRef h13_ref = ref(h13, DType::kBFloat16, {pairs, 2 * inter});
  const TensorRef y_ref = ref(y, DType::kBFloat16, {pairs, hidden});
  moelora::FusedMoeLoraArgs w13, w2;
  w13.input = x_ref;
  w13.input_pairs_per_row = top_k;
  w13.output = h13_ref;
  w13.slices = {gate.view, up.view};
  w13.col_offsets = {0, inter};
  w2.input = h_ref;
  w2.output = y_ref;
  w2.topk_weights = w_ref;
  w2.slices = {down.view};
  w2.col_offsets = {0};
  for (moelora::FusedMoeLoraArgs* site : {&w13, &w2}) {
    site->sorted_pairs = sorted_ref;
    site->block_slot = bs_ref;
    site->block_expert = be_ref;
    site->num_blocks = nb_ref;
    site->block_m = block_m;
    site->topk_ids = ids_ref;
    site->token_slot = slot_ref;
    site->active_slots = adapters;
  }
  moelora::MoeLoraAlignArgs align;
  align.topk_ids = ids_ref;
  align.token_slot = slot_ref;
  align.num_experts = experts;
  align.num_slots = adapters;
  align.block_m = block_m;
  align.sorted_pairs = sorted_ref;
  align.block_slot = bs_ref;
  align.block_expert = be_ref;
  align.num_blocks = nb_ref;
  const bool unsorted = plan.form == moelora::LoraForm::kUnsorted;
  auto layer = [&]() {
    if (unsorted) {
      moelora::fused_moe_lora_unsorted(w13, nullptr, &plan);
      moelora::fused_moe_lora_unsorted(w2, nullptr, &plan);
      return;
    }
    moelora::moe_lora_align(align, nullptr, &plan);
    moelora::fused_moe_lora(w13, nullptr, &plan);
    moelora::fused_moe_lora(w2, nullptr, &plan);
  };
  for (int i = 0; i < 10; ++i) layer();
  MOELORA_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  MOELORA_CUDA_CHECK(cudaEventCreate(&start));
  MOELORA_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < iters; ++i) {
    MOELORA_CUDA_CHECK(cudaEventRecord(start));
    layer();
    MOELORA_CUDA_CHECK(cudaEventRecord(stop));
    MOELORA_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    MOELORA_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms * 1e3f);
  }
  std::sort(times.begin(), times.end());
  std::printf("{\"bench\": \"bench_kernels\", \"tokens\": %ld, \"adapters\": %d, \"rank\": %d, "
              "\"hidden\": %ld, \"inter\": %ld, \"experts\": %d, \"top_k\": %d, "
              "\"plan\": \"%s\", \"median_us_with_launches\": %.2f}\n",
              static_cast<long>(tokens), adapters, rank, static_cast<long>(hidden),
              static_cast<long>(inter), experts, top_k, plan.describe().c_str(),
              times[times.size() / 2]);
  return 0;
}
#else
int main() {
  std::printf("bench_kernels: CPU-only build, nothing to time\n");
  return 0;
}
#endif
