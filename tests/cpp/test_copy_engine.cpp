// The CPU copy engine under concurrent submitters; HostBuffer ownership; the CUDA engine's run
// planning (coalescing, independence, splitting over streams) and, on a GPU, its batched,
// split and per-run paths (including the fallback when batches are refused), byte for byte.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "copy_engine_internal.h"
#include "moelora/arena.h"
#include "moelora/copy_engine.h"
#include "moelora/error.h"
#include "moelora/runtime.h"
#include "test_harness.h"

using namespace moelora;

TEST_CASE("cpu copy engine: concurrent submits from threads copy every byte") {
  auto engine = make_cpu_copy_engine();
  constexpr int kThreads = 6, kJobsPerThread = 40;
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      CopyTicket previous = kNoCopyTicket;
      for (int j = 0; j < kJobsPerThread; ++j) {
        // Awkward sizes, several regions per job, some empty.
        const int64_t bytes = 1 + (t * 977 + j * 131) % 5003;
        std::vector<uint8_t> src(bytes * 3), dst(bytes * 3, 0xEE);
        for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 7 + t + j);
        std::vector<CopyRegion> regions = {{dst.data(), src.data(), bytes},
                                           {dst.data() + bytes, src.data() + bytes, 0},
                                           {dst.data() + bytes, src.data() + bytes, 2 * bytes}};
        CopyTicket ticket = engine->submit(regions);
        if (ticket <= previous) ++bad;  // tickets increase in submission order
        previous = ticket;
        if (j % 2) {
          engine->wait(ticket);
        } else {
          engine->make_stream_wait(ticket, nullptr);
        }
        if (!engine->is_done(ticket) || dst != src) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK_EQ(bad.load(), 0);
}

TEST_CASE("cpu copy engine: tickets complete in order; destruction drains the queue") {
  std::vector<std::vector<uint8_t>> sources, targets;
  std::vector<CopyTicket> tickets;
  {
    auto engine = make_cpu_copy_engine();
    for (int i = 0; i < 50; ++i) {
      sources.emplace_back(100000 + i, static_cast<uint8_t>(i + 1));
      targets.emplace_back(100000 + i, 0);
    }
    for (int i = 0; i < 50; ++i) {
      tickets.push_back(engine->submit({{targets[i].data(), sources[i].data(),
                                         static_cast<int64_t>(sources[i].size())}}));
    }
    engine->wait(tickets[25]);
    for (int i = 0; i <= 25; ++i) CHECK(engine->is_done(tickets[i]));
    CHECK(engine->is_done(kNoCopyTicket));
    CHECK_THROWS_AS(engine->wait(tickets.back() + 100), InvalidArgument);
    CHECK_THROWS_AS(engine->submit({{nullptr, sources[0].data(), 4}}), InvalidArgument);
    CHECK_THROWS_AS(engine->submit({{targets[0].data(), sources[0].data(), -1}}),
                    InvalidArgument);
    CHECK(engine->device() == DeviceKind::kCPU);
  }  // destructor: every submitted copy completes
  for (int i = 0; i < 50; ++i) CHECK(targets[i] == sources[i]);
}

TEST_CASE("cpu copy engine: synchronize waits for everything") {
  auto engine = make_cpu_copy_engine();
  std::vector<uint8_t> src(1 << 20, 3), dst(1 << 20, 0);
  for (int i = 0; i < 8; ++i) {
    engine->submit({{dst.data() + i * (1 << 17), src.data() + i * (1 << 17), 1 << 17}});
  }
  engine->synchronize();
  CHECK(dst == src);
}

TEST_CASE("cuda copy engine is refused without CUDA") {
  bool threw_cuda = false;
  try {
    auto engine = make_cuda_copy_engine(0, 2);
    // A machine with a GPU: the engine must really copy.
    std::vector<uint8_t> src(4096, 9), dst(4096, 0);
    engine->wait(engine->submit({{dst.data(), src.data(), 4096}}));
    CHECK(dst == src);
  } catch (const CudaError&) {
    threw_cuda = true;
  }
  if (!cuda_available()) CHECK(threw_cuda);  // no GPU: a typed error, never a crash
}

namespace {

CopyRegion region(std::vector<uint8_t>& dst, int64_t dst_at, const std::vector<uint8_t>& src,
                  int64_t src_at, int64_t bytes) {
  return {dst.data() + dst_at, src.data() + src_at, bytes};
}

}  // namespace

TEST_CASE("copy plan: coalescing drops empty regions and merges continued ones") {
  std::vector<uint8_t> src(1000), dst(1000);
  const std::vector<CopyRegion> regions = {
      region(dst, 0, src, 0, 100),   region(dst, 100, src, 100, 50),  // continues: merged
      region(dst, 150, src, 150, 0),                                  // empty: dropped
      region(dst, 150, src, 150, 10),                                 // continues again
      region(dst, 300, src, 160, 10),                                 // dst jumps
      region(dst, 310, src, 400, 10),                                 // src jumps
      region(dst, 320, src, 410, 5)};
  const std::vector<CopyRegion> runs = detail::coalesce_copy_runs(regions);
  CHECK_EQ(runs.size(), size_t{3});
  CHECK(runs[0].dst == dst.data() && runs[0].src == src.data());
  CHECK_EQ(runs[0].bytes, int64_t{160});
  CHECK(runs[1].dst == dst.data() + 300);
  CHECK_EQ(runs[1].bytes, int64_t{10});
  CHECK(runs[2].dst == dst.data() + 310 && runs[2].src == src.data() + 400);
  CHECK_EQ(runs[2].bytes, int64_t{15});
  CHECK(detail::coalesce_copy_runs({}).empty());
  CHECK(detail::coalesce_copy_runs({{nullptr, nullptr, 0}}).empty());
}

TEST_CASE("copy plan: runs are independent unless one writes what another writes or reads") {
  std::vector<uint8_t> a(1000), b(1000);
  // Disjoint destinations, sources elsewhere; touching ranges do not overlap.
  CHECK(detail::copy_runs_independent(
      {region(a, 100, b, 0, 100), region(a, 0, b, 500, 100), region(a, 200, b, 100, 50)}));
  CHECK(detail::copy_runs_independent({}));
  // Two runs write the same bytes: the later one must win, so they are ordered.
  CHECK(!detail::copy_runs_independent({region(a, 0, b, 0, 100), region(a, 99, b, 200, 10)}));
  CHECK(!detail::copy_runs_independent({region(a, 50, b, 0, 10), region(a, 0, b, 200, 500)}));
  // A run reads bytes another run writes (either order).
  CHECK(!detail::copy_runs_independent({region(a, 0, b, 0, 100), region(b, 0, a, 50, 10)}));
  CHECK(!detail::copy_runs_independent({region(b, 0, a, 95, 10), region(a, 0, b, 500, 100)}));
  // A source that only touches a destination is fine; one that contains it is not.
  CHECK(detail::copy_runs_independent({region(a, 100, b, 0, 100), region(b, 200, a, 200, 10)}));
  CHECK(!detail::copy_runs_independent({region(a, 100, b, 0, 10), region(b, 200, a, 0, 500)}));
  // Brute force against random small layouts in one buffer.
  std::mt19937 rng(7);
  std::vector<uint8_t> buf(256);
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<CopyRegion> runs;
    const int n = 1 + static_cast<int>(rng() % 5);
    for (int i = 0; i < n; ++i) {
      const int64_t bytes = 1 + rng() % 24;
      runs.push_back(region(buf, rng() % (256 - bytes), buf, rng() % (256 - bytes), bytes));
    }
    bool expected = true;
    auto overlap = [](const void* p, int64_t pn, const void* q, int64_t qn) {
      auto x = static_cast<const uint8_t*>(p), y = static_cast<const uint8_t*>(q);
      return x < y + qn && y < x + pn;
    };
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        if (i != j && overlap(runs[i].dst, runs[i].bytes, runs[j].dst, runs[j].bytes)) {
          expected = false;
        }
        if (overlap(runs[i].dst, runs[i].bytes, runs[j].src, runs[j].bytes)) expected = false;
      }
    }
    if (detail::copy_runs_independent(runs) != expected) {
      CHECK(detail::copy_runs_independent(runs) == expected);
      break;
    }
  }
}

TEST_CASE("copy plan: splitting gives contiguous non-empty groups of about equal bytes") {
  std::vector<uint8_t> buf(1);
  auto runs_of = [&](const std::vector<int64_t>& sizes) {
    std::vector<CopyRegion> runs;
    for (int64_t s : sizes) runs.push_back({buf.data(), buf.data(), s});
    return runs;
  };
  CHECK(detail::split_copy_runs({}, 4) == std::vector<size_t>{0});
  CHECK((detail::split_copy_runs(runs_of({5, 5, 5, 5}), 1) == std::vector<size_t>{0, 4}));
  CHECK((detail::split_copy_runs(runs_of({5, 5, 5, 5}), 2) == std::vector<size_t>{0, 2, 4}));
  CHECK((detail::split_copy_runs(runs_of({5, 5, 5, 5}), 0) == std::vector<size_t>{0, 4}));
  CHECK((detail::split_copy_runs(runs_of({1, 2}), 8) == std::vector<size_t>{0, 1, 2}));
  CHECK((detail::split_copy_runs(runs_of({100, 1, 1, 1}), 2) == std::vector<size_t>{0, 1, 4}));
  CHECK((detail::split_copy_runs(runs_of({1, 1, 1, 100}), 2) == std::vector<size_t>{0, 3, 4}));
  CHECK((detail::split_copy_runs(runs_of({1, 1, 1, 100}), 3) == std::vector<size_t>{0, 2, 3, 4}));
  std::mt19937 rng(11);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<int64_t> sizes(1 + rng() % 40);
    for (int64_t& s : sizes) s = 1 + rng() % 1000;
    const int parts = 1 + static_cast<int>(rng() % 6);
    const std::vector<size_t> bounds = detail::split_copy_runs(runs_of(sizes), parts);
    bool ok = bounds.front() == 0 && bounds.back() == sizes.size() &&
              bounds.size() - 1 == std::min(sizes.size(), static_cast<size_t>(parts));
    for (size_t g = 1; g < bounds.size(); ++g) ok = ok && bounds[g] > bounds[g - 1];
    if (!ok) {
      CHECK(ok);
      break;
    }
  }
}

TEST_CASE("cuda copy engine knobs: typed errors without a GPU or for other engines") {
  auto cpu = make_cpu_copy_engine();
  CHECK_THROWS_AS(detail::cuda_copy_stats(*cpu), InvalidArgument);
  if (!cuda_available()) {
    CHECK_THROWS_AS(detail::make_cuda_copy_engine_tuned(0, 2, detail::CudaCopyTuning{}),
                    CudaError);
    return;
  }
  detail::CudaCopyTuning bad;
  bad.split_streams = -1;
  CHECK_THROWS_AS(detail::make_cuda_copy_engine_tuned(0, 2, bad), InvalidArgument);
  CHECK_THROWS_AS(detail::make_cuda_copy_engine_tuned(0, 0, detail::CudaCopyTuning{}),
                  InvalidArgument);
}

namespace {

// An adapter of `pages` packed pages copied into pages scattered over a device arena (runs of
// 1-8 pages, shuffled), some runs cut short, then read back scattered into pageable memory.
struct ScatterCase {
  std::vector<CopyRegion> load;      // host -> device
  std::vector<CopyRegion> readback;  // device -> host
};

ScatterCase scatter(std::byte* device, const std::byte* packed, std::byte* back, int64_t pages,
                    int64_t page_bytes, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t p = 0; p < pages;) {
    const int64_t len = std::min<int64_t>(1 + rng() % 8, pages - p);
    runs.push_back({p, len});
    p += len;
  }
  std::shuffle(runs.begin(), runs.end(), rng);
  ScatterCase c;
  int64_t src = 0;
  for (auto [first, len] : runs) {
    const int64_t bytes = len * page_bytes - (rng() % 3 == 0 ? 1 + rng() % 255 : 0);
    c.load.push_back({device + first * page_bytes, packed + src, bytes});
    c.readback.push_back({back + src, device + first * page_bytes, bytes});
    src += len * page_bytes;
  }
  return c;
}

bool covered_bytes_equal(const ScatterCase& c, const std::byte* packed, const std::byte* back) {
  for (const CopyRegion& r : c.readback) {
    const int64_t at = static_cast<const std::byte*>(r.dst) - back;
    if (std::memcmp(back + at, packed + at, static_cast<size_t>(r.bytes)) != 0) return false;
  }
  return true;
}

void print_stats(const char* name, const detail::CudaCopyStats& s) {
  std::printf("  %s: submits %lld, batch calls %lld (%lld runs), per-run calls %lld, "
              "fallbacks %lld, split %lld, ordered %lld%s%s\n",
              name, static_cast<long long>(s.submits), static_cast<long long>(s.batch_calls),
              static_cast<long long>(s.batched_runs), static_cast<long long>(s.per_run_calls),
              static_cast<long long>(s.batch_fallbacks), static_cast<long long>(s.split_submits),
              static_cast<long long>(s.ordered_submits), s.batch_error.empty() ? "" : "; ",
              s.batch_error.c_str());
}

}  // namespace

TEST_CASE("cuda copy engine: scattered runs, batched / split / per-run / refused, every byte") {
  if (!cuda_available()) {
    std::printf("  (no GPU: skipped)\n");
    return;
  }
  constexpr int64_t kPageBytes = 4096, kPages = 3000;  // ~12 MiB: large enough to split
  constexpr int64_t kBytes = kPageBytes * kPages;
  std::unique_ptr<Arena> arena = make_cuda_arena(kBytes, 0);
  HostBuffer packed(kBytes, /*try_pinned=*/true);
  for (int64_t i = 0; i < kBytes; ++i) packed.data()[i] = std::byte((i * 131 + i / 4096) % 251);
  HostBuffer zeros(kBytes, /*try_pinned=*/true);
  std::memset(zeros.data(), 0, kBytes);

  struct Variant {
    const char* name;
    detail::CudaCopyTuning tuning;
    int streams;
  };
  std::vector<Variant> variants;
  variants.push_back({"default", detail::CudaCopyTuning{}, 2});
  detail::CudaCopyTuning t;
  t.split_streams = 1;
  variants.push_back({"batched, one stream", t, 2});
  t = detail::CudaCopyTuning{};
  t.overlap_hint_max_bytes = std::numeric_limits<int64_t>::max();
  t.split_min_bytes = 0;
  variants.push_back({"batched, overlap hint, split over 4", t, 4});
  t = detail::CudaCopyTuning{};
  t.batched = false;
  variants.push_back({"per run, split", t, 3});
  t = detail::CudaCopyTuning{};
  t.simulate_batch_unsupported = true;
  variants.push_back({"batches refused", t, 2});

  unsigned seed = 100;
  for (const Variant& v : variants) {
    auto engine = detail::make_cuda_copy_engine_tuned(0, v.streams, v.tuning);
    for (int round = 0; round < 3; ++round) {
      std::vector<std::byte> back(kBytes, std::byte{0xEE});  // pageable on purpose
      ScatterCase c = scatter(arena->base(), packed.data(), back.data(), kPages, kPageBytes,
                              ++seed);
      engine->wait(engine->submit({{arena->base(), zeros.data(), kBytes}}));
      // Load in two tickets in flight at once, then read back in one.
      const size_t half = c.load.size() / 2;
      const auto middle = c.load.begin() + static_cast<std::ptrdiff_t>(half);
      CopyTicket t1 = engine->submit(std::vector<CopyRegion>(c.load.begin(), middle));
      CopyTicket t2 = engine->submit(std::vector<CopyRegion>(middle, c.load.end()));
      CHECK(t2 > t1);
      engine->wait(t1);
      engine->make_stream_wait(t2, nullptr);  // the legacy stream waits on the GPU
      engine->wait(t2);
      CHECK(engine->is_done(t1) && engine->is_done(t2));
      engine->wait(engine->submit(c.readback));
      if (!covered_bytes_equal(c, packed.data(), back.data())) {
        std::printf("  %s, round %d: wrong bytes\n", v.name, round);
        CHECK(false);
      }
    }
    const detail::CudaCopyStats s = detail::cuda_copy_stats(*engine);
    print_stats(v.name, s);
    CHECK_EQ(s.submits, int64_t{12});
    CHECK_EQ(s.ordered_submits, int64_t{0});
    if (v.tuning.simulate_batch_unsupported) {
      CHECK_EQ(s.batch_calls, int64_t{0});
      CHECK_EQ(s.batch_fallbacks, int64_t{detail::cuda_batch_copy_compiled() ? 1 : 0});
      CHECK(!s.batches_enabled);
      if (detail::cuda_batch_copy_compiled()) {
        CHECK(s.batch_error.find("simulated") != std::string::npos);
      }
    } else if (!v.tuning.batched) {
      CHECK_EQ(s.batch_calls, int64_t{0});
      CHECK_EQ(s.batch_fallbacks, int64_t{0});
    } else if (detail::cuda_batch_copy_compiled()) {
      // Either the driver took the batches, or it refused them with a recorded reason.
      CHECK(s.batch_calls > 0 || !s.batch_error.empty());
    }
    if (v.tuning.split_streams != 1 && v.streams > 1) CHECK(s.split_submits > 0);
    if (v.tuning.split_streams == 1) CHECK_EQ(s.split_submits, int64_t{0});
  }
  // A simulated refusal is remembered by its engine only: a new engine batches again.
  auto fresh = make_cuda_copy_engine(0, 2);
  std::vector<std::byte> back(kBytes, std::byte{0});
  ScatterCase c = scatter(arena->base(), packed.data(), back.data(), kPages, kPageBytes, 999);
  fresh->wait(fresh->submit(c.load));
  fresh->wait(fresh->submit(c.readback));
  CHECK(covered_bytes_equal(c, packed.data(), back.data()));
  const detail::CudaCopyStats s = detail::cuda_copy_stats(*fresh);
  if (detail::cuda_batch_copy_compiled()) CHECK(s.batch_calls > 0 || !s.batch_error.empty());
}

TEST_CASE("cuda copy engine: dependent runs of one submission are copied in order") {
  if (!cuda_available()) {
    std::printf("  (no GPU: skipped)\n");
    return;
  }
  auto engine = make_cuda_copy_engine(0, 2);
  std::unique_ptr<Arena> arena = make_cuda_arena(1 << 20, 0);
  std::vector<uint8_t> first(8192, 1), second(8192, 2), third(4096, 3), back(8192, 0);
  std::byte* d = arena->base();
  // Overlapping destinations (later wins), then a run that reads what an earlier one wrote.
  engine->wait(engine->submit({{d, first.data(), 8192},
                               {d + 4096, third.data(), 4096},
                               {d + 65536, second.data(), 8192},
                               {d + 4096, d + 65536, 2048}}));
  engine->wait(engine->submit({{back.data(), d, 8192}}));
  bool ok = true;
  for (int i = 0; i < 8192; ++i) {
    const uint8_t want = i < 4096 ? 1 : (i < 4096 + 2048 ? 2 : 3);
    ok = ok && back[i] == want;
  }
  CHECK(ok);
  const detail::CudaCopyStats s = detail::cuda_copy_stats(*engine);
  CHECK_EQ(s.ordered_submits, int64_t{1});
  CHECK_EQ(s.split_submits, int64_t{0});
}

TEST_CASE("host buffer: aligned, movable, zero-sized") {
  HostBuffer a(12345);
  CHECK(a.data() != nullptr);
  CHECK_EQ(reinterpret_cast<uintptr_t>(a.data()) % 4096, uintptr_t{0});
  CHECK_EQ(a.bytes(), int64_t{12345});
  std::memset(a.data(), 0x5A, 12345);
  std::byte* raw = a.data();
  HostBuffer b(std::move(a));
  CHECK(a.data() == nullptr);
  CHECK_EQ(a.bytes(), int64_t{0});
  CHECK(b.data() == raw);
  HostBuffer c(100, false);
  c = std::move(b);
  CHECK(c.data() == raw);
  CHECK(static_cast<uint8_t>(c.data()[12344]) == 0x5A);
  HostBuffer empty(0);
  CHECK(empty.data() == nullptr);
  CHECK_THROWS_AS(HostBuffer(-1), InvalidArgument);
}

MOELORA_TEST_MAIN()
