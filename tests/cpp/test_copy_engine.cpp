// The CPU copy engine under concurrent submitters; HostBuffer ownership.
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

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
