// Residency by queue demand, popularity and recency, in both tiers: reads start in queue order;
// a resident adapter that queued requests wait for is not evicted (by a slot or by the pool's
// page hunt) for one further back or not wanted at all; among idle ones the less popular goes
// first; host copies of waiting adapters are kept over idle ones; and the load metrics (counts,
// bytes, latency histograms per tier) add up.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "adapter_cache_internal.h"
#include "moelora/error.h"
#include "test_adapter_cache_util.h"
#include "test_harness.h"

using namespace moelora;
using namespace moelora_test;

namespace moelora {
std::ostream& operator<<(std::ostream& os, Residency r) { return os << residency_name(r); }
}  // namespace moelora

namespace {

constexpr int64_t kPageBytes = 512;

struct Tiers {
  Tiers(int32_t max_loras, int64_t max_cpu_loras, int64_t arena_pages, int32_t host_threads = 1,
        int32_t pack_threads = 1, int64_t popularity_half_life = 256)
      : pool(make_host_arena(kPageBytes * arena_pages), kPageBytes),
        copies(make_cpu_copy_engine()) {
    AdapterCacheConfig config;
    config.sites = awkward_sites();
    config.max_loras = max_loras;
    config.max_lora_rank = 8;
    config.max_cpu_loras = max_cpu_loras;
    config.dtype = DType::kBFloat16;
    config.host_threads = host_threads;
    config.pack_threads = pack_threads;
    config.read_chunk_bytes = 4096;
    config.popularity_half_life = popularity_half_life;
    cache = std::make_unique<AdapterCache>(pool, *copies, config);
  }
  ~Tiers() { cache.reset(); }
  int64_t add(const std::string& name) {
    adapters.push_back(write_awkward_adapter(name, temp_path(name + ".st"), {}));
    return cache->register_adapter(adapters.back().spec);
  }
  Residency residency(int64_t id) const { return cache->residency(id); }

  PagePool pool;
  std::unique_ptr<CopyEngine> copies;
  std::unique_ptr<AdapterCache> cache;
  std::vector<AwkwardAdapter> adapters;
};

// Holds every read of adapter `gated` at its first chunk until open() is called, and records
// the order in which adapters start reading.
struct ReadGate {
  explicit ReadGate(std::string gated) : gated(std::move(gated)) {}
  void install(AdapterCache& cache) {
    detail::set_read_hook(cache, [this](const std::string& adapter, int32_t, int64_t chunk) {
      std::unique_lock<std::mutex> lock(mutex);
      if (chunk == 0) started.push_back(adapter);
      if (adapter == gated) {
        held = true;
        cv.notify_all();
        cv.wait(lock, [&] { return opened; });
      }
    });
  }
  void wait_held() {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return held; });
  }
  void open() {
    std::lock_guard<std::mutex> lock(mutex);
    opened = true;
    cv.notify_all();
  }
  std::string gated;
  std::mutex mutex;
  std::condition_variable cv;
  bool held = false, opened = false;
  std::vector<std::string> started;
};

// Until the cache's threads have nothing left to do and nothing can start without a call.
bool settled(AdapterCache& cache) {
  return eventually([&] { return detail::is_settled(cache); });
}

void check_pool(const PagePool& pool) {
  CHECK_EQ(pool.stats().pinned_adapter_pages, int64_t{0});
  pool.check_invariants();
}

}  // namespace

TEST_CASE("reads start in queue order, not in the order they were asked for") {
  ReadGate g("gate");    // outlives the cache, whose readers call it
  Tiers t(4, 8, 2048);  // one read at a time
  const int64_t gate = t.add("gate");
  const int64_t x = t.add("x"), y = t.add("y"), z = t.add("z");
  g.install(*t.cache);
  t.cache->prefetch(gate);
  g.wait_held();
  for (int64_t id : {x, y, z}) t.cache->prefetch(id);  // arrival order x, y, z
  t.cache->set_demand({z, x, y});                    // queue order z, x, y
  g.open();
  for (int64_t id : {gate, x, y, z}) t.cache->wait(id);
  detail::set_read_hook(*t.cache, nullptr);
  CHECK(g.started == (std::vector<std::string>{"gate", "z", "x", "y"}));
  check_pool(t.pool);
}

TEST_CASE("a slot held by an adapter queued requests wait for goes only to one ahead of it") {
  Tiers t(2, 8, 2048);
  const int64_t a = t.add("a"), b = t.add("b"), c = t.add("c");
  t.cache->set_demand({a, b});
  t.cache->wait(a);
  t.cache->wait(b);
  // c is wanted by nobody queued: it may not take a or b's slot.
  t.cache->load_host(c);
  CHECK_EQ(t.cache->prefetch(c), Residency::kWaitingForMemory);
  CHECK_THROWS_AS(t.cache->wait(c), PoolExhausted);
  CHECK_EQ(t.residency(a), Residency::kDevice);
  CHECK_EQ(t.residency(b), Residency::kDevice);
  // Behind both in the queue: still no slot.
  t.cache->set_demand({a, b, c});
  CHECK_EQ(t.residency(c), Residency::kWaitingForMemory);
  // Ahead of b: b (furthest back) makes room; a stays.
  t.cache->set_demand({a, c, b});
  CHECK(t.cache->wait(c) >= 0);
  CHECK_EQ(t.residency(a), Residency::kDevice);
  CHECK(t.residency(b) != Residency::kDevice);
  // Nobody queued any more: b's request comes back and takes the least recently used (a).
  t.cache->set_demand({});
  t.cache->touch(c);
  CHECK(t.cache->wait(b) >= 0);
  CHECK_EQ(t.residency(c), Residency::kDevice);
  CHECK(t.residency(a) != Residency::kDevice);
  CHECK_EQ(t.cache->stats().device_evictions, int64_t{2});
  check_pool(t.pool);
}

TEST_CASE("among idle adapters the less popular leaves first, and popularity fades") {
  Tiers t(2, 8, 4096);
  const int64_t fav = t.add("fav"), once = t.add("once"), next = t.add("next");
  for (int i = 0; i < 5; ++i) t.cache->note_request(fav);
  t.cache->wait(fav);
  t.cache->note_request(once);
  t.cache->wait(once);  // `once` is the more recent; `fav` asked for five times
  t.cache->note_request(next);
  CHECK(t.cache->wait(next) >= 0);
  CHECK_EQ(t.residency(fav), Residency::kDevice);  // recency alone would have evicted it
  CHECK(t.residency(once) != Residency::kDevice);
  // 256 requests per halving (the default): after 2600 requests for another adapter, fav's
  // five have decayed below one and no longer count; recency decides between fav and next.
  for (int i = 0; i < 2600; ++i) t.cache->note_request(once);
  CHECK(t.cache->wait(once) >= 0);
  CHECK_EQ(t.residency(next), Residency::kDevice);
  CHECK(t.residency(fav) != Residency::kDevice);
  check_pool(t.pool);
}

TEST_CASE("popularity_half_life 0: recency alone decides among idle adapters") {
  Tiers t(2, 8, 4096, 1, 1, 0);
  const int64_t fav = t.add("fav"), once = t.add("once"), next = t.add("next");
  for (int i = 0; i < 5; ++i) t.cache->note_request(fav);
  t.cache->wait(fav);
  t.cache->note_request(once);
  t.cache->wait(once);
  t.cache->note_request(next);
  CHECK(t.cache->wait(next) >= 0);
  CHECK_EQ(t.residency(once), Residency::kDevice);
  check_pool(t.pool);
}

TEST_CASE("the pool's hunt for pages passes over adapters that queued requests wait for") {
  // Pages for two adapters only, slots for three: the pool evicts by LRU for the third.
  Tiers probe(3, 8, 4096);
  const int64_t pages = probe.cache->num_pages(probe.add("probe"));
  Tiers t(3, 8, 2 * pages + pages / 2);
  const int64_t a = t.add("a"), b = t.add("b"), c = t.add("c");
  t.cache->wait(a);  // a is the least recently used...
  t.cache->wait(b);
  t.cache->set_demand({a, c});  // ...but queued requests wait for it, ahead of c
  CHECK(t.cache->wait(c) >= 0);
  CHECK_EQ(t.residency(a), Residency::kDevice);
  CHECK(t.residency(b) != Residency::kDevice);  // idle: it made room
  CHECK_EQ(t.pool.stats().adapter_owners, int64_t{2});
  check_pool(t.pool);
}

TEST_CASE("host copies of adapters queued requests wait for are kept over idle ones") {
  // One slot (held by a pinned adapter), two host copies.
  Tiers t(1, 2, 4096);
  const int64_t busy = t.add("busy"), idle = t.add("idle");
  const int64_t first = t.add("first"), second = t.add("second"), third = t.add("third");
  t.cache->wait(busy);
  t.cache->acquire(busy);
  t.cache->load_host(idle);
  CHECK_EQ(t.cache->stats().host_copies, int64_t{2});  // busy's and idle's
  // Two queued adapters wait for the slot: their copies replace the idle ones.
  t.cache->set_demand({first, second});
  CHECK(settled(*t.cache));
  CHECK_EQ(t.residency(first), Residency::kWaitingForMemory);
  CHECK_EQ(t.residency(second), Residency::kWaitingForMemory);
  CHECK_EQ(t.residency(idle), Residency::kDisk);
  CHECK_EQ(t.cache->stats().host_copies, int64_t{2});
  // One further back does not replace them: its read waits.
  t.cache->set_demand({first, second, third});
  CHECK(settled(*t.cache));
  CHECK_EQ(t.residency(third), Residency::kLoading);  // queued for a read
  CHECK_EQ(t.residency(second), Residency::kWaitingForMemory);
  // Moved ahead of second, it replaces second's copy.
  t.cache->set_demand({first, third, second});
  CHECK(settled(*t.cache));
  CHECK_EQ(t.residency(third), Residency::kWaitingForMemory);
  CHECK_EQ(t.residency(second), Residency::kLoading);  // wants a read again
  CHECK_EQ(t.residency(first), Residency::kWaitingForMemory);
  // The slot frees: each gets it in queue order once the one before is done.
  t.cache->release(busy);
  CHECK(t.cache->wait(first) >= 0);
  t.cache->set_demand({third, second});
  CHECK(t.cache->wait(third) >= 0);
  t.cache->set_demand({second});
  CHECK(t.cache->wait(second) >= 0);
  CHECK_EQ(t.cache->stats().failed, int64_t{0});
  check_pool(t.pool);
}

TEST_CASE("reads for adapters outside the demand list do not evict each other's copies") {
  Tiers t(1, 2, 4096);  // one slot, two host copies, one reader
  const int64_t busy = t.add("busy");
  t.cache->wait(busy);
  t.cache->acquire(busy);  // holds the slot
  std::vector<int64_t> p;
  for (const char* name : {"p0", "p1", "p2", "p3"}) p.push_back(t.add(name));
  for (int64_t id : p) t.cache->prefetch(id);  // wanted, no queue position yet
  // p0 and p1 take the host tier (busy's copy is idle: busy is on the device); p2 and p3 do not
  // replace them, nor each other, while they all wait for the slot.
  CHECK(settled(*t.cache));
  AdapterCacheStats st = t.cache->stats();
  CHECK_EQ(st.host_loads, int64_t{3});
  CHECK_EQ(st.host_evictions, int64_t{1});
  CHECK_EQ(t.residency(p[0]), Residency::kWaitingForMemory);
  CHECK_EQ(t.residency(p[1]), Residency::kWaitingForMemory);
  CHECK_EQ(t.residency(p[2]), Residency::kLoading);  // queued for a read
  CHECK_EQ(t.residency(p[3]), Residency::kLoading);
  // In the queue, p3 goes first: its read replaces the least recently used unqueued copy (p0's,
  // whose read is queued again) and it takes busy's slot.
  t.cache->release(busy);
  t.cache->set_demand({p[3]});
  CHECK(t.cache->wait(p[3]) >= 0);
  // On the device, p3's host copy is idle: p2's read replaces it. p0 and p2 now wait with p1.
  CHECK(settled(*t.cache));
  st = t.cache->stats();
  CHECK_EQ(st.host_loads, int64_t{5});
  CHECK_EQ(st.host_evictions, int64_t{3});
  CHECK_EQ(st.device_evictions, int64_t{1});
  CHECK_EQ(t.residency(p[3]), Residency::kDevice);
  CHECK_EQ(t.residency(p[0]), Residency::kLoading);
  CHECK_EQ(t.residency(p[1]), Residency::kWaitingForMemory);
  CHECK_EQ(t.residency(p[2]), Residency::kWaitingForMemory);
  // Its request gone, p3 is idle: p2, first in line now, takes the slot; then p2's host copy is
  // idle and p0's read replaces it.
  t.cache->set_demand({p[2]});
  CHECK(t.cache->wait(p[2]) >= 0);
  CHECK(settled(*t.cache));
  CHECK_EQ(t.residency(p[3]), Residency::kDisk);
  CHECK_EQ(t.residency(p[0]), Residency::kWaitingForMemory);
  CHECK_EQ(t.cache->stats().host_loads, int64_t{6});
  CHECK_EQ(t.cache->stats().failed, int64_t{0});
  check_pool(t.pool);
}

TEST_CASE("load metrics: counts, bytes and latency histograms per tier add up") {
  Tiers t(2, 8, 4096, 2, 2);
  std::vector<int64_t> ids;
  for (const char* name : {"m0", "m1", "m2"}) ids.push_back(t.add(name));
  for (int64_t id : ids) t.cache->wait(id);  // 3 host loads, 3 device loads, 1 eviction
  const AdapterCacheStats st = t.cache->stats();
  CHECK_EQ(st.host_loads, int64_t{3});
  CHECK_EQ(st.device_loads, int64_t{3});
  CHECK_EQ(st.device_evictions, int64_t{1});
  CHECK_EQ(st.host_load_histogram.size(), load_seconds_buckets().size() + 1);
  CHECK_EQ(st.device_load_histogram.size(), load_seconds_buckets().size() + 1);
  int64_t host_count = 0, device_count = 0;
  for (int64_t n : st.host_load_histogram) host_count += n;
  for (int64_t n : st.device_load_histogram) device_count += n;
  CHECK_EQ(host_count, int64_t{3});
  CHECK_EQ(device_count, int64_t{3});
  CHECK(st.host_load_seconds > 0.0 && st.load_seconds > 0.0);
  AdapterCacheConfig config;
  config.sites = awkward_sites();
  config.max_lora_rank = 8;
  config.dtype = DType::kBFloat16;
  const auto entry = detail::validate_adapter_spec(t.adapters[0].spec, config, kPageBytes);
  CHECK_EQ(st.host_bytes_read,
           3 * detail::build_read_plan(*entry, DType::kBFloat16, 4096).read_bytes);
  CHECK_EQ(st.bytes_loaded, 3 * t.cache->num_pages(ids[0]) * kPageBytes);
  CHECK_EQ(st.host_buffers_in_use, st.host_copies);
  check_pool(t.pool);
}

MOELORA_TEST_MAIN()
