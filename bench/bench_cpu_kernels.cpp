// Times the CPU reference kernels on a few decode- and prefill-like shapes. One JSON line per
// case: {"bench":"cpu_kernels","op":...,"shape":...,"median_us":...,"gflops":...}.
//   bench_cpu_kernels [--iters N]
// Data is random normal (never zeros); LoRA rows are packed contiguously in a host arena.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "half.h"
#include "moelora/ops.h"

using namespace moelora;

namespace {

double median_us(int iters, const std::function<void()>& run) {
  run();  // warm-up
  std::vector<double> times;
  for (int i = 0; i < iters; ++i) {
    auto start = std::chrono::steady_clock::now();
    run();
    auto elapsed = std::chrono::steady_clock::now() - start;
    times.push_back(std::chrono::duration<double, std::micro>(elapsed).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

template <typename T>
std::vector<T> random_values(size_t count, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<T> values(count);
  for (auto& v : values) v = from_float<T>(normal(rng));
  return values;
}

// One site's rows for num_slots x num_experts, all of rank `rank`, packed back to back.
struct PackedSite {
  std::vector<std::byte> arena;
  std::vector<int64_t> row_offsets;
  std::vector<int32_t> ranks;
  LoraSiteView view;
};

PackedSite pack_site(int32_t slots, int32_t experts, int32_t rank, int64_t in_dim,
                     int64_t out_dim, std::mt19937& rng) {
  PackedSite site;
  int64_t a_bytes = lora_row_bytes(in_dim, DType::kBFloat16);
  int64_t b_bytes = lora_row_bytes(out_dim, DType::kBFloat16);
  site.row_offsets.resize(size_t(slots) * experts * 2 * rank);
  int64_t offset = 0;
  for (int32_t s = 0; s < slots; ++s)
    for (int32_t e = 0; e < experts; ++e)
      for (int is_b = 0; is_b < 2; ++is_b)
        for (int32_t r = 0; r < rank; ++r) {
          site.row_offsets[((size_t(s) * experts + e) * 2 + is_b) * rank + r] = offset;
          offset += is_b ? b_bytes : a_bytes;
        }
  auto values = random_values<BFloat16>(size_t(offset) / 2, rng, 0.05f);
  site.arena.resize(size_t(offset));
  std::memcpy(site.arena.data(), values.data(), size_t(offset));
  site.ranks.assign(size_t(slots), rank);
  site.view = LoraSiteView{site.arena.data(), site.row_offsets.data(), int64_t(experts) * 2 * rank,
                           site.ranks.data(), 1, slots, experts, rank, in_dim, out_dim,
                           DType::kBFloat16};
  return site;
}

void bench_fused(int tokens, int top_k, int experts, int slots, int rank, int64_t hidden,
                 int64_t inter, int iters, std::mt19937& rng) {
  const int32_t block_m = tokens * top_k >= 256 ? 16 : 4;
  std::vector<int32_t> topk(static_cast<size_t>(tokens) * top_k);
  std::vector<int32_t> token_slot(static_cast<size_t>(tokens));
  std::uniform_int_distribution<int> pick_expert(0, experts - 1), pick_slot(-1, slots - 1);
  for (auto& e : topk) e = pick_expert(rng);
  for (auto& s : token_slot) s = pick_slot(rng);
  const int64_t pairs = int64_t(tokens) * top_k;
  const int64_t max_blocks = moe_lora_align_max_blocks(pairs, experts, slots, block_m);
  std::vector<int32_t> sorted_pairs(static_cast<size_t>(max_blocks * block_m));
  std::vector<int32_t> block_slot(static_cast<size_t>(max_blocks));
  std::vector<int32_t> block_expert(static_cast<size_t>(max_blocks));
  std::vector<int32_t> num_blocks(1);
  auto ref = [](void* p, DType d, std::initializer_list<int64_t> s) {
    return make_tensor_ref(p, d, s);
  };
  TensorRef ids = ref(topk.data(), DType::kInt32, {tokens, top_k});
  TensorRef slot_ref = ref(token_slot.data(), DType::kInt32, {tokens});
  TensorRef pairs_ref = ref(sorted_pairs.data(), DType::kInt32, {max_blocks * block_m});
  TensorRef bslot = ref(block_slot.data(), DType::kInt32, {max_blocks});
  TensorRef bexp = ref(block_expert.data(), DType::kInt32, {max_blocks});
  TensorRef nblk = ref(num_blocks.data(), DType::kInt32, {1});
  char shape[160];
  std::snprintf(shape, sizeof(shape), "T=%d K=%d E=%d S=%d r=%d hidden=%lld inter=%lld", tokens,
                top_k, experts, slots, rank, (long long)hidden, (long long)inter);
  MoeLoraAlignArgs align;
  align.topk_ids = ids;
  align.token_slot = slot_ref;
  align.num_experts = experts;
  align.num_slots = slots;
  align.block_m = block_m;
  align.sorted_pairs = pairs_ref;
  align.block_slot = bslot;
  align.block_expert = bexp;
  align.num_blocks = nblk;
  double align_us = median_us(iters, [&] { moe_lora_align(align, nullptr); });
  std::printf("{\"bench\":\"cpu_kernels\",\"op\":\"moe_lora_align\",\"shape\":\"%s\","
              "\"median_us\":%.2f}\n", shape, align_us);

  PackedSite gate = pack_site(slots, experts, rank, hidden, inter, rng);
  PackedSite up = pack_site(slots, experts, rank, hidden, inter, rng);
  PackedSite down = pack_site(slots, experts, rank, inter, hidden, rng);
  auto x = random_values<BFloat16>(size_t(tokens) * hidden, rng);
  auto h13 = random_values<BFloat16>(size_t(pairs) * 2 * inter, rng);
  auto h = random_values<BFloat16>(size_t(pairs) * inter, rng);
  auto y = random_values<BFloat16>(size_t(pairs) * hidden, rng);
  std::vector<float> weights(size_t(pairs), 0.5f);
  const double adapter_pairs = double(pairs) * slots / (slots + 1);  // slot -1 tokens skip
  const double flops = 2.0 * adapter_pairs * rank * (2 * (hidden + inter) + (inter + hidden));
  FusedMoeLoraArgs w13, w2;
  w13.input = ref(x.data(), DType::kBFloat16, {tokens, hidden});
  w13.input_pairs_per_row = top_k;
  w13.output = ref(h13.data(), DType::kBFloat16, {pairs, 2 * inter});
  w13.slices = {gate.view, up.view};
  w13.col_offsets = {0, inter};
  w2.input = ref(h.data(), DType::kBFloat16, {pairs, inter});
  w2.output = ref(y.data(), DType::kBFloat16, {pairs, hidden});
  w2.topk_weights = ref(weights.data(), DType::kFloat32, {pairs});
  w2.slices = {down.view};
  w2.col_offsets = {0};
  for (FusedMoeLoraArgs* site : {&w13, &w2}) {
    site->sorted_pairs = pairs_ref;
    site->block_slot = bslot;
    site->block_expert = bexp;
    site->num_blocks = nblk;
    site->block_m = block_m;
  }
  double fused_us = median_us(iters, [&] {
    fused_moe_lora(w13, nullptr);
    fused_moe_lora(w2, nullptr);
  });
  std::printf("{\"bench\":\"cpu_kernels\",\"op\":\"fused_moe_lora_w13_w2\",\"shape\":\"%s\","
              "\"dtype\":\"bfloat16\",\"median_us\":%.2f,\"gflops\":%.3f}\n",
              shape, fused_us, flops / fused_us * 1e-3);
}

void bench_attention(int seqs, int seq_len, int queries_per_seq, int heads, int kv_heads,
                     int head_dim, int iters, std::mt19937& rng) {
  const int block_tokens = 16;
  const int blocks_per_seq = (seq_len + block_tokens - 1) / block_tokens;
  const int64_t page_bytes =
      kv_page_bytes_needed(block_tokens, kv_heads, head_dim, DType::kBFloat16);
  auto arena = random_values<BFloat16>(size_t(page_bytes / 2) * seqs * blocks_per_seq, rng);
  KvCacheView cache{reinterpret_cast<std::byte*>(arena.data()), page_bytes, block_tokens,
                    kv_heads, head_dim, DType::kBFloat16};
  std::vector<int32_t> table(static_cast<size_t>(seqs) * blocks_per_seq);
  std::vector<int32_t> lens(static_cast<size_t>(seqs), seq_len);
  for (size_t i = 0; i < table.size(); ++i) table[i] = int32_t(i);
  std::shuffle(table.begin(), table.end(), rng);
  const int tokens = seqs * queries_per_seq;
  std::vector<int32_t> q_seq, q_pos;
  for (int s = 0; s < seqs; ++s)
    for (int i = 0; i < queries_per_seq; ++i) {
      q_seq.push_back(s);
      q_pos.push_back(seq_len - queries_per_seq + i);
    }
  auto query = random_values<BFloat16>(size_t(tokens) * heads * head_dim, rng);
  std::vector<BFloat16> out(query.size());
  PagedAttentionArgs args;
  args.out = make_tensor_ref(out.data(), DType::kBFloat16, {tokens, heads, head_dim});
  args.query = make_tensor_ref(query.data(), DType::kBFloat16, {tokens, heads, head_dim});
  args.query_seq = make_tensor_ref(q_seq.data(), DType::kInt32, {tokens});
  args.query_pos = make_tensor_ref(q_pos.data(), DType::kInt32, {tokens});
  args.block_table = make_tensor_ref(table.data(), DType::kInt32, {seqs, blocks_per_seq});
  args.seq_lens = make_tensor_ref(lens.data(), DType::kInt32, {seqs});
  args.cache = cache;
  args.scale = 0.125f;
  double us = median_us(iters, [&] { paged_attention(args, nullptr); });
  std::printf("{\"bench\":\"cpu_kernels\",\"op\":\"paged_attention\",\"shape\":\"seqs=%d "
              "len=%d q/seq=%d heads=%d kv_heads=%d head_dim=%d\",\"dtype\":\"bfloat16\","
              "\"median_us\":%.2f}\n",
              seqs, seq_len, queries_per_seq, heads, kv_heads, head_dim, us);
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 10;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--iters") == 0) iters = std::max(1, std::atoi(argv[i + 1]));
  }
  std::mt19937 rng(1234);
  bench_fused(8, 2, 8, 4, 16, 1024, 512, iters, rng);    // decode
  bench_fused(256, 2, 8, 4, 16, 1024, 512, iters, rng);  // prefill chunk
  bench_attention(8, 512, 1, 16, 4, 64, iters, rng);     // decode
  bench_attention(1, 512, 64, 16, 4, 64, iters, rng);    // chunked prefill
  return 0;
}
