// Embedding libmoelora from C++: a host page pool shared by KV blocks and an adapter, with LRU
// eviction of the idle adapter when the KV cache needs its pages.
#include <moelora/moelora.h>

#include <cstdio>

int main() {
  using namespace moelora;
  std::printf("libmoelora %s (CUDA %s)\n", version(), cuda_available() ? "available" : "absent");

  const int64_t page_bytes = 64 * 1024;
  PagePool pool(make_host_arena(64 * page_bytes), page_bytes);

  // An adapter takes pages in proportion to its real rank.
  std::vector<LoraSite> sites = {{"experts.gate", 2, 8, 1024, 512}, {"experts.down", 2, 8, 512, 1024}};
  AdapterRowLayout rank8(sites, {{8, 8}, {8, 8}}, DType::kBFloat16, page_bytes, 64);
  AdapterRowLayout rank32(sites, {{32, 32}, {32, 32}}, DType::kBFloat16, page_bytes, 64);
  std::printf("pages for rank 8: %lld, rank 32: %lld\n", (long long)rank8.num_pages(),
              (long long)rank32.num_pages());

  pool.allocate(adapter_owner(1), rank8.num_pages());
  pool.set_used_bytes(adapter_owner(1), rank8.used_bytes());

  // KV needs more than what is free: the idle adapter is evicted to make room.
  const int64_t kv_need = pool.free_pages() + 1;
  AllocationOutcome outcome = pool.try_allocate(kv_owner(7), kv_need, Eviction::kIdleAdapters);
  std::printf("kv allocation of %lld pages: %s, adapters evicted: %zu\n", (long long)kv_need,
              outcome.ok ? "ok" : "exhausted", outcome.evicted.size());

  // Asking for more than the pool holds is an ordinary, typed outcome.
  try {
    pool.allocate(kv_owner(8), pool.num_pages() + 1);
  } catch (const PoolExhausted& e) {
    std::printf("expected: %s\n", e.what());
  }
  pool.check_invariants();
  PoolStats stats = pool.stats();
  std::printf("pages: total %lld, kv %lld, adapter %lld, free %lld\n",
              (long long)stats.total_pages, (long long)stats.kv_pages,
              (long long)stats.adapter_pages, (long long)stats.free_pages);
  return outcome.ok && outcome.evicted.size() == 1 ? 0 : 1;
}
