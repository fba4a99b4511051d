// A cold adapter's device copy streams from its read: block copies are queued while later
// chunks are still read, every block only once all the chunks that write it are converted (the
// device rows match an independent reference whatever order the readers finish in), and the
// row table goes last. A read that fails, a copy that cannot be queued, or an unregister in the
// middle of a streamed load fails or drops that adapter alone, and every page and slot comes
// back once its queued copies have landed; so do a read that ends or fails while its load is
// taking pages.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <functional>
#include <iterator>
#include <mutex>
#include <thread>

#include "adapter_cache_internal.h"
#include "moelora/error.h"
#include "test_adapter_cache_util.h"
#include "test_harness.h"

using namespace moelora;
using namespace moelora_test;

namespace {

constexpr int64_t kPageBytes = 512;

// The CPU copy engine, counting what it is given; submits throw when told to. It can say it
// is a CUDA engine, which copies asynchronously only from page-locked memory.
class CountingCopyEngine final : public CopyEngine {
 public:
  DeviceKind kind = DeviceKind::kCPU;
  std::atomic<int> submits{0};
  std::atomic<int64_t> bytes{0};
  std::atomic<int> fail_submits_after{-1};  // submits beyond this many throw (-1: none)

  CopyTicket submit(std::vector<CopyRegion> regions) override {
    if (fail_submits_after >= 0 && submits >= fail_submits_after) {
      throw CudaError("injected submit failure");
    }
    ++submits;
    for (const CopyRegion& r : regions) bytes += r.bytes;
    return inner_->submit(std::move(regions));
  }
  bool is_done(CopyTicket ticket) override { return inner_->is_done(ticket); }
  void wait(CopyTicket ticket) override { inner_->wait(ticket); }
  void make_stream_wait(CopyTicket ticket, void*) override { wait(ticket); }
  void synchronize() override { inner_->synchronize(); }
  DeviceKind device() const override { return kind; }

 private:
  std::unique_ptr<CopyEngine> inner_ = make_cpu_copy_engine();
};

// Host copies in blocks of two pages, read in 4 KiB chunks: an F32 awkward adapter of rank 8
// is ~30 blocks and ~15 chunks.
struct Cache {
  explicit Cache(int32_t max_loras = 2, int64_t pool_pages = 2048,
                 DeviceKind engine = DeviceKind::kCPU)
      : pool(make_host_arena(kPageBytes * pool_pages), kPageBytes) {
    copies.kind = engine;
    AdapterCacheConfig config;
    config.sites = awkward_sites();
    config.max_loras = max_loras;
    config.max_lora_rank = 8;
    config.dtype = DType::kBFloat16;
    config.host_threads = 2;
    config.pack_threads = 3;
    config.read_chunk_bytes = 4096;
    config.host_block_bytes = 2 * kPageBytes;
    config.host_reserve_bytes = 0;
    cache = std::make_unique<AdapterCache>(pool, copies, config);
  }
  ~Cache() { cache.reset(); }
  int64_t mismatches(const AwkwardAdapter& a, int32_t slot) const {
    return awkward_mismatches([&](int s, int l) { return cache->site_view(s, l); }, a, slot,
                              DType::kBFloat16);
  }
  // Only `resident` hold pages; nothing is pinned.
  void check_accounts(const std::vector<int64_t>& resident) const {
    int64_t pages = 0;
    for (int64_t id : resident) pages += cache->num_pages(id);
    const PoolStats st = pool.stats();
    CHECK_EQ(st.adapter_pages, pages);
    CHECK_EQ(st.adapter_owners, static_cast<int64_t>(resident.size()));
    CHECK_EQ(st.pinned_adapter_pages, int64_t{0});
    pool.check_invariants();
  }

  PagePool pool;
  CountingCopyEngine copies;
  std::unique_ptr<AdapterCache> cache;
};

AwkwardAdapter big_adapter(const std::string& name, uint32_t salt = 0) {
  AwkwardOptions o;
  o.src_dtype = "F32";
  o.ranks = {8, 8};
  o.scale = 0.5f + static_cast<float>(salt) / 8.0f;
  return write_awkward_adapter(name, temp_path(name + ".st"), o);
}

// Holds back the reads of one adapter's chunk `held` until released.
struct ChunkGate {
  std::mutex mutex;
  std::condition_variable cv;
  bool open = false;
  std::atomic<bool> reached{false};
  void hold() {
    reached = true;
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return open; });
  }
  void release() {
    std::lock_guard<std::mutex> lock(mutex);
    open = true;
    cv.notify_all();
  }
};

// `a` validated as the caches here register it (bf16 rows in 512-byte pages).
std::shared_ptr<detail::AdapterEntry> entry_of(const AwkwardAdapter& a) {
  AdapterCacheConfig config;
  config.sites = awkward_sites();
  config.max_lora_rank = 8;
  config.dtype = DType::kBFloat16;
  return detail::validate_adapter_spec(a.spec, config, kPageBytes);
}

// Holds the read of `a`'s last chunk in `gate` (then fails it, with `fail`), prefetches `id`
// and waits until that chunk is reached and a block copy is queued: the load streams, its read
// not yet done.
void stream_until_held(Cache& c, const AwkwardAdapter& a, int64_t id, ChunkGate& gate,
                       bool fail = false) {
  const auto held = static_cast<int64_t>(
      detail::build_read_plan(*entry_of(a), DType::kBFloat16, 4096).chunks.size() - 1);
  detail::set_read_hook(*c.cache, [&gate, held, fail, name = a.spec.name](
                                      const std::string& adapter, int32_t, int64_t chunk) {
    if (adapter != name || chunk != held) return;
    gate.hold();
    if (fail) throw IoError("injected read failure");
  });
  c.cache->prefetch(id);
  CHECK(eventually([&] { return gate.reached.load() && c.copies.submits.load() >= 1; }));
}

}  // namespace

TEST_CASE("chunk_host_blocks covers every byte a chunk writes") {
  const AwkwardAdapter a = big_adapter("stream_plan");
  auto entry = entry_of(a);
  const detail::ReadPlan plan = detail::build_read_plan(*entry, DType::kBFloat16, 4096);
  const int64_t block = 2 * kPageBytes;
  const auto blocks = detail::chunk_host_blocks(*entry, plan, DType::kBFloat16, block);
  CHECK_EQ(blocks.size(), plan.chunks.size());
  CHECK(plan.chunks.size() > 8);
  // Convert each chunk alone into a buffer of zeros: whatever it writes lies in its blocks.
  const int64_t bytes = entry->host_copy_bytes();
  std::ifstream in(a.spec.files[0], std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto* file = reinterpret_cast<const std::byte*>(text.data());
  int64_t blocks_listed = 0;
  for (size_t c = 0; c < plan.chunks.size(); ++c) {
    HostBuffer host(bytes, false, block);
    for (int64_t i = 0; i < bytes; ++i) *host.at(i) = std::byte{0};
    detail::ReaderScratch scratch;
    for (const detail::ChunkPiece& piece : plan.chunks[c].pieces) {
      detail::convert_piece(*entry, plan, piece, file + plan.chunks[c].offset,
                            DType::kBFloat16, host, scratch);
    }
    detail::stream_fence();
    int64_t outside = 0;
    for (int64_t i = 0; i < bytes; ++i) {
      if (*host.at(i) == std::byte{0}) continue;
      const auto b = static_cast<int32_t>(i / block);
      outside += !std::binary_search(blocks[c].begin(), blocks[c].end(), b);
    }
    CHECK_EQ(outside, int64_t{0});
    blocks_listed += static_cast<int64_t>(blocks[c].size());
  }
  // Not every chunk claims the whole copy.
  CHECK(blocks_listed < static_cast<int64_t>(plan.chunks.size()) * (bytes / block));
}

TEST_CASE("a cold adapter's blocks go to the device while its last chunk is still read") {
  Cache c;
  const AwkwardAdapter a = big_adapter("stream_a");
  const int64_t id = c.cache->register_adapter(a.spec);
  ChunkGate gate;
  // The other chunks' blocks are queued (the held chunk's and the row table are not).
  stream_until_held(c, a, id, gate);
  CHECK(c.copies.bytes.load() > 0);
  CHECK(c.copies.bytes.load() < c.cache->num_pages(id) * kPageBytes);
  CHECK_EQ(static_cast<int>(c.cache->residency(id)), static_cast<int>(Residency::kLoading));
  CHECK_EQ(c.cache->stats().device_loads_streamed, int64_t{1});
  gate.release();
  const int32_t slot = c.cache->wait(id);
  CHECK_EQ(c.mismatches(a, slot), int64_t{0});
  CHECK_EQ(c.copies.bytes.load(), c.cache->num_pages(id) * kPageBytes);  // each page once
  const AdapterCacheStats st = c.cache->stats();
  CHECK_EQ(st.device_loads, int64_t{1});
  CHECK_EQ(st.host_loads, int64_t{1});
  CHECK_EQ(st.bytes_loaded, c.cache->num_pages(id) * kPageBytes);
  detail::set_read_hook(*c.cache, nullptr);
  c.check_accounts({id});
}

TEST_CASE("a read into memory a CUDA engine cannot copy from asynchronously does not stream") {
  Cache c(2, 2048, DeviceKind::kCUDA);  // no page-locking here: host blocks stay ordinary
  const AwkwardAdapter a = big_adapter("stream_unpinned");
  const int64_t id = c.cache->register_adapter(a.spec);
  const int32_t slot = c.cache->wait(id);
  CHECK_EQ(c.mismatches(a, slot), int64_t{0});
  const AdapterCacheStats st = c.cache->stats();
  CHECK_EQ(st.device_loads_streamed, int64_t{0});
  CHECK_EQ(st.device_loads, int64_t{1});
  CHECK_EQ(c.copies.submits.load(), 1);  // the whole copy and the row table, after the read
  c.check_accounts({id});
}

TEST_CASE("streamed copies match the reference whatever order the chunks finish in") {
  for (uint32_t seed = 1; seed <= 6; ++seed) {
    Cache c;
    const AwkwardAdapter a = big_adapter("stream_order_" + std::to_string(seed), seed);
    const int64_t id = c.cache->register_adapter(a.spec);
    detail::set_read_hook(*c.cache, [&c, seed](const std::string&, int32_t, int64_t chunk) {
      // Once the load streams, some early chunks finish last: blocks complete out of order.
      CHECK(eventually([&] { return c.cache->stats().device_loads_streamed == 1; }));
      const auto h = static_cast<uint32_t>(chunk) * 2654435761u ^ seed * 40503u;
      std::this_thread::sleep_for(std::chrono::microseconds((h >> 7) % 3000));
    });
    const int32_t slot = c.cache->wait(id);
    CHECK_EQ(c.mismatches(a, slot), int64_t{0});
    CHECK_EQ(c.cache->stats().device_loads_streamed, int64_t{1});
    CHECK(c.copies.submits.load() > 2);
    detail::set_read_hook(*c.cache, nullptr);
    c.check_accounts({id});
  }
}

TEST_CASE("a read failing after its first blocks were copied fails that adapter alone") {
  Cache c(1);
  const AwkwardAdapter a = big_adapter("stream_fail");
  const AwkwardAdapter b = big_adapter("stream_next", 3);
  const int64_t ida = c.cache->register_adapter(a.spec);
  const int64_t idb = c.cache->register_adapter(b.spec);
  ChunkGate gate;
  stream_until_held(c, a, ida, gate, /*fail=*/true);
  gate.release();
  CHECK_THROWS_AS(c.cache->wait(ida), AdapterError);
  CHECK(c.cache->error_message(ida).find("injected read failure") != std::string::npos);
  c.check_accounts({});
  // The only slot came back: the next adapter loads into it, intact.
  CHECK_EQ(c.cache->wait(idb), 0);
  CHECK_EQ(c.mismatches(b, 0), int64_t{0});
  detail::set_read_hook(*c.cache, nullptr);
  c.check_accounts({idb});
}

TEST_CASE("a block copy that cannot be queued fails that adapter alone") {
  Cache c(1);
  const AwkwardAdapter a = big_adapter("stream_nocopy");
  const AwkwardAdapter b = big_adapter("stream_after", 5);
  const int64_t ida = c.cache->register_adapter(a.spec);
  const int64_t idb = c.cache->register_adapter(b.spec);
  c.copies.fail_submits_after = 1;  // the first block copy is queued, the next ones throw
  detail::set_read_hook(*c.cache, [&c](const std::string&, int32_t, int64_t) {
    CHECK(eventually([&] { return c.cache->stats().device_loads_streamed == 1; }));
  });
  CHECK_THROWS_AS(c.cache->wait(ida), AdapterError);
  CHECK(c.cache->error_message(ida).find("injected submit failure") != std::string::npos);
  c.check_accounts({});
  c.copies.fail_submits_after = -1;
  detail::set_read_hook(*c.cache, nullptr);
  CHECK_EQ(c.cache->wait(idb), 0);
  CHECK_EQ(c.mismatches(b, 0), int64_t{0});
  c.check_accounts({idb});
}

TEST_CASE("unregistering an adapter while it streams gives back its pages and slot") {
  Cache c(1);
  const AwkwardAdapter a = big_adapter("stream_gone");
  const AwkwardAdapter b = big_adapter("stream_stays", 7);
  const int64_t ida = c.cache->register_adapter(a.spec);
  ChunkGate gate;
  stream_until_held(c, a, ida, gate);
  c.cache->unregister(ida);
  gate.release();
  CHECK(eventually([&] { return detail::is_settled(*c.cache); }));
  c.check_accounts({});
  const int64_t idb = c.cache->register_adapter(b.spec);
  CHECK_EQ(c.cache->wait(idb), 0);
  CHECK_EQ(c.mismatches(b, 0), int64_t{0});
  detail::set_read_hook(*c.cache, nullptr);
  c.check_accounts({idb});
}

// A pool of room for one big adapter and a half: a second one's pages evict the first, and
// the pool's eviction listener (on the thread starting the load, between its slot and its
// pages) holds that load until `until` is true.
struct EvictionGate {
  std::atomic<bool> armed{true};
  void hold_in(Cache& c, std::function<bool()> until) {
    c.pool.add_eviction_listener([this, until](Owner) {
      if (armed.exchange(false)) CHECK(eventually(until));
    });
  }
};

int64_t pages_of_big_adapter() {
  return entry_of(big_adapter("stream_size"))->layout->num_pages();
}

TEST_CASE("a read that ends while its load takes pages: the load copies the host copy") {
  const int64_t pages = pages_of_big_adapter();
  Cache c(2, pages * 3 / 2);
  const AwkwardAdapter x = big_adapter("stream_resident");
  const AwkwardAdapter y = big_adapter("stream_late", 2);
  const int64_t idx = c.cache->register_adapter(x.spec);
  const int64_t idy = c.cache->register_adapter(y.spec);
  c.cache->wait(idx);
  const int64_t streamed_before = c.cache->stats().device_loads_streamed;
  EvictionGate gate;  // evicting x for y waits until y's host copy is made
  gate.hold_in(c, [&] { return c.cache->residency(idy) == Residency::kLoading &&
                               c.cache->stats().host_loads == 2; });
  const int32_t slot = c.cache->wait(idy);
  CHECK_EQ(c.mismatches(y, slot), int64_t{0});
  CHECK_EQ(c.cache->stats().device_loads_streamed, streamed_before);  // never attached
  CHECK_EQ(static_cast<int>(c.cache->residency(idx)), static_cast<int>(Residency::kHost));
  c.check_accounts({idy});
}

TEST_CASE("a read that fails while its load takes pages: slot and pages go back") {
  const int64_t pages = pages_of_big_adapter();
  Cache c(2, pages * 3 / 2);
  const AwkwardAdapter x = big_adapter("stream_kept");
  const AwkwardAdapter y = big_adapter("stream_broken", 4);
  const int64_t idx = c.cache->register_adapter(x.spec);
  const int64_t idy = c.cache->register_adapter(y.spec);
  c.cache->wait(idx);
  std::atomic<bool> fail{true};
  detail::set_read_hook(*c.cache, [&](const std::string& adapter, int32_t, int64_t) {
    if (adapter == "stream_broken" && fail) {
      // Not before the load has its slot: the failure lands while it takes pages.
      CHECK(eventually([&] { return c.cache->stats().device_evictions > 0 || !fail; }));
      throw IoError("injected read failure");
    }
  });
  EvictionGate gate;  // evicting x for y waits until y has failed
  gate.hold_in(c, [&] { return c.cache->residency(idy) == Residency::kFailed; });
  CHECK_THROWS_AS(c.cache->wait(idy), AdapterError);
  CHECK(eventually([&] { return detail::is_settled(*c.cache); }));
  fail = false;
  detail::set_read_hook(*c.cache, nullptr);
  c.check_accounts({});
  // Both slots are free again: x loads back, y (registered again) next to it.
  c.cache->unregister(idy);
  const int64_t again = c.cache->register_adapter(y.spec);
  CHECK(c.cache->wait(again) >= 0);
  CHECK_EQ(c.mismatches(y, c.cache->wait(again)), int64_t{0});
  c.check_accounts({again});
}

TEST_CASE("the cache goes away in the middle of a streamed load") {
  auto c = std::make_unique<Cache>();
  const AwkwardAdapter a = big_adapter("stream_shutdown");
  const int64_t id = c->cache->register_adapter(a.spec);
  ChunkGate gate;
  stream_until_held(*c, a, id, gate);
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    gate.release();
  });
  c->cache.reset();  // joins the readers: the held one finishes its chunk first
  opener.join();
  const PoolStats st = c->pool.stats();
  CHECK_EQ(st.adapter_pages, int64_t{0});
  c->pool.check_invariants();
}

MOELORA_TEST_MAIN()
