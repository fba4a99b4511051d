// Faults of the adapter cache's worker threads: weights that are NaN or Inf, files that vanish,
// shrink or are rewritten after registration, and copy-engine calls that throw on the loader and
// finalizer threads. Each becomes a failed adapter whose message names the adapter, the tensor
// or the file's base name (never a directory); nothing escapes a thread; every page goes back.
// Also the graph-capture scope: a capturing thread cannot make a synchronising call.
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <string>
#include <thread>

#include "moelora/adapter_cache.h"
#include "moelora/error.h"
#include "safetensors_writer.h"
#include "test_harness.h"

using namespace moelora;
using namespace moelora_test;

namespace {

constexpr int64_t kIn = 24, kOut = 40, kRank = 4, kLayers = 2;

std::vector<LoraSite> sites() { return {{"q_proj", kLayers, 1, kIn, kOut}}; }

// One adapter file (at `path`, or a new temporary one): per layer an A [r, in] and a B stored
// [out, r]; `poison` puts `bad` into element 5 of layer 1's B.
AdapterSpec write_adapter(const std::string& name, float bad = 0.0f, bool poison = false,
                          const std::string& path = "") {
  AdapterSpec spec;
  spec.name = name;
  spec.files = {path.empty() ? temp_path(name + ".safetensors") : path};
  spec.ranks = {{static_cast<int32_t>(kRank), static_cast<int32_t>(kRank)}};
  std::vector<TensorToWrite> tensors;
  for (int l = 0; l < kLayers; ++l) {
    for (bool is_b : {false, true}) {
      const int64_t dim = is_b ? kOut : kIn;
      std::vector<float> values(kRank * dim);
      for (size_t k = 0; k < values.size(); ++k) values[k] = static_cast<float>(k % 7) / 8.0f;
      if (poison && is_b && l == 1) values[5] = bad;
      const std::string tensor = "layers." + std::to_string(l) + (is_b ? ".lora_B" : ".lora_A");
      tensors.push_back({tensor, "F32", {is_b ? dim : kRank, is_b ? kRank : dim},
                         as_bytes(values)});
      LoraMatrixSource m;
      m.site = 0;
      m.layer = l;
      m.is_b = is_b;
      m.tensor = tensor;
      m.rows = kRank;
      m.cols = dim;
      m.row_stride = is_b ? 1 : dim;
      m.col_stride = is_b ? kRank : 1;
      spec.matrices.push_back(m);
    }
  }
  write_safetensors(spec.files[0], tensors);
  return spec;
}

bool contains(const std::string& text, const std::string& needle) {
  if (text.find(needle) != std::string::npos) return true;
  std::fprintf(stderr, "  message '%s' lacks '%s'\n", text.c_str(), needle.c_str());
  return false;
}

std::string directory_of(const std::string& path) { return path.substr(0, path.rfind('/')); }

// Forwards to the CPU copy engine; throws from submit() or wait() when told to.
class FaultyCopyEngine final : public CopyEngine {
 public:
  std::atomic<int> fail_submits{0};  // the next N submits throw
  std::atomic<int> fail_waits{0};    // the next N waits throw (after the copy completed)

  CopyTicket submit(std::vector<CopyRegion> regions) override {
    if (fail_submits > 0) {
      --fail_submits;
      throw CudaError("injected submit failure");
    }
    return inner_->submit(std::move(regions));
  }
  bool is_done(CopyTicket ticket) override { return inner_->is_done(ticket); }
  void wait(CopyTicket ticket) override {
    inner_->wait(ticket);
    if (fail_waits > 0) {
      --fail_waits;
      throw CudaError("injected wait failure");
    }
  }
  void make_stream_wait(CopyTicket ticket, void* stream) override { wait(ticket); }
  void synchronize() override { inner_->synchronize(); }
  DeviceKind device() const override { return DeviceKind::kCPU; }

 private:
  std::unique_ptr<CopyEngine> inner_ = make_cpu_copy_engine();
};

template <typename Engine>
struct Fixture {
  explicit Fixture(int32_t max_loras = 2)
      : pool(make_host_arena(256 * 1024), 1024), copies(std::make_unique<Engine>()) {
    AdapterCacheConfig config;
    config.sites = sites();
    config.max_loras = max_loras;
    config.max_lora_rank = 8;
    config.pack_threads = 2;
    cache = std::make_unique<AdapterCache>(pool, *copies, config);
  }
  ~Fixture() { cache.reset(); }
  PagePool pool;
  std::unique_ptr<Engine> copies;
  std::unique_ptr<AdapterCache> cache;
};

// Expects `id` to fail (through wait) with a message holding every needle and no directory.
void expect_failed(AdapterCache& cache, int64_t id, const std::string& file,
                   const std::vector<std::string>& needles) {
  CHECK_THROWS_AS(cache.wait(id), AdapterError);
  CHECK_EQ(static_cast<int>(cache.residency(id)), static_cast<int>(Residency::kFailed));
  const std::string message = cache.error_message(id);
  for (const std::string& needle : needles) CHECK(contains(message, needle));
  CHECK(message.find(directory_of(file)) == std::string::npos);
  try {
    cache.wait(id);
  } catch (const AdapterError& e) {
    CHECK_EQ(std::string(e.what()), message);  // one "adapter 'x': " prefix, same words
  }
}

}  // namespace

TEST_CASE("load-thread faults fail their adapter alone and name the tensor or file") {
  Fixture<FaultyCopyEngine> f;
  AdapterSpec good = write_adapter("fault_good");
  AdapterSpec nan = write_adapter("fault_nan", NAN, true);
  AdapterSpec inf = write_adapter("fault_inf", -INFINITY, true);
  AdapterSpec gone = write_adapter("fault_gone");
  AdapterSpec shrunk = write_adapter("fault_shrunk");
  AdapterSpec rewritten = write_adapter("fault_rewritten");
  std::vector<int64_t> ids;
  for (const AdapterSpec* spec : {&good, &nan, &inf, &gone, &shrunk, &rewritten}) {
    ids.push_back(f.cache->register_adapter(*spec));
  }
  // Broken between registration and load.
  CHECK(::unlink(gone.files[0].c_str()) == 0);
  CHECK(::truncate(shrunk.files[0].c_str(), 100) == 0);
  write_adapter("fault_rewritten", 0.5f, true, rewritten.files[0]);  // same size, new contents
  for (int64_t id : ids) f.cache->prefetch(id);
  expect_failed(*f.cache, ids[1], nan.files[0], {"adapter 'fault_nan'", "'layers.1.lora_B'",
                                                 "holds NaN", "fault_nan.safetensors"});
  expect_failed(*f.cache, ids[2], inf.files[0], {"'layers.1.lora_B'", "holds Inf"});
  expect_failed(*f.cache, ids[3], gone.files[0], {"fault_gone.safetensors' is gone"});
  expect_failed(*f.cache, ids[4], shrunk.files[0], {"was truncated", "100 bytes"});
  expect_failed(*f.cache, ids[5], rewritten.files[0], {"changed since"});
  f.cache->wait(ids[0]);
  CHECK_EQ(f.cache->stats().failed, int64_t{5});
  // A failed adapter holds no page and no pin; only the good one is on the device.
  PoolStats st = f.pool.stats();
  CHECK_EQ(st.adapter_pages, f.cache->num_pages(ids[0]));
  CHECK_EQ(st.pinned_adapter_pages, int64_t{0});
  // Unload and load again after the file is fixed: the adapter works.
  f.cache->unregister(ids[3]);
  write_adapter("fault_gone", 0.0f, false, gone.files[0]);
  const int64_t again = f.cache->register_adapter(gone);
  CHECK(f.cache->wait(again) >= 0);
  f.pool.check_invariants();
}

TEST_CASE("copy-engine exceptions on the loader and finalizer threads fail only their adapter") {
  Fixture<FaultyCopyEngine> f(1);
  AdapterSpec a = write_adapter("copy_a"), b = write_adapter("copy_b");
  AdapterSpec c = write_adapter("copy_c");
  const int64_t ida = f.cache->register_adapter(a);
  const int64_t idb = f.cache->register_adapter(b);
  const int64_t idc = f.cache->register_adapter(c);
  f.cache->load_host(ida);
  f.copies->fail_submits = 1;  // thrown inside prefetch's load start
  f.cache->prefetch(ida);
  expect_failed(*f.cache, ida, a.files[0], {"adapter 'copy_a'", "injected submit failure"});
  f.copies->fail_waits = 1;  // thrown on the finalizer thread
  expect_failed(*f.cache, idb, b.files[0], {"adapter 'copy_b'", "injected wait failure"});
  // Slots and pages came back: the next adapter loads into the only slot.
  CHECK_EQ(f.cache->wait(idc), 0);
  PoolStats st = f.pool.stats();
  CHECK_EQ(st.adapter_pages, f.cache->num_pages(idc));
  CHECK_EQ(st.pinned_adapter_pages, int64_t{0});
  // Reloading a failed adapter works once the fault is gone.
  f.cache->unregister(idb);
  const int64_t idb2 = f.cache->register_adapter(b);
  f.cache->unregister(idc);
  CHECK_EQ(f.cache->wait(idb2), 0);
  f.pool.check_invariants();
}

TEST_CASE("a thread capturing a graph cannot synchronise; other threads keep loading") {
  Fixture<FaultyCopyEngine> f;
  const int64_t id = f.cache->register_adapter(write_adapter("capture_a"));
  const int64_t other = f.cache->register_adapter(write_adapter("capture_b"));
  const CopyTicket ticket = f.copies->submit({});
  {
    GraphCaptureScope scope;
    CHECK(this_thread_capturing());
    std::unique_ptr<CopyEngine> cpu = make_cpu_copy_engine();
    CHECK_THROWS_AS(cpu->wait(cpu->submit({})), InvalidArgument);
    CHECK_THROWS_AS(cpu->synchronize(), InvalidArgument);
    CHECK_THROWS_AS(f.cache->wait(id), InvalidArgument);
    CHECK_THROWS_AS(f.cache->prefetch(id), InvalidArgument);
    CHECK_THROWS_AS(f.cache->load_host(id), InvalidArgument);
    // Bookkeeping calls do not synchronise and stay allowed.
    CHECK_EQ(f.cache->slot_of(id), -1);
    CHECK_EQ(static_cast<int>(f.cache->residency(id)), static_cast<int>(Residency::kDisk));
    int32_t slot = -1;
    std::thread loader([&] {
      CHECK(!this_thread_capturing());
      slot = f.cache->wait(other);
    });
    loader.join();
    CHECK(slot >= 0);
    { GraphCaptureScope nested; }
    CHECK(this_thread_capturing());
  }
  CHECK(!this_thread_capturing());
  f.copies->wait(ticket);
  CHECK(f.cache->wait(id) >= 0);
}

MOELORA_TEST_MAIN()
