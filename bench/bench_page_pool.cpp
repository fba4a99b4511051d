// Replays a synthetic serving trace against the page pool on a host arena and times every pool
// call. Requests arrive with a Zipf-distributed adapter, pin it (loading it first when it is not
// resident, evicting idle adapters), grow their KV page by page, and finish; when KV cannot grow
// the youngest request is preempted, as the scheduler does. One JSON line per case.
//   bench_page_pool [--pages N] [--ops N] [--seed N] [--page-bytes N]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <random>
#include <string>
#include <vector>

#include "moelora/arena.h"
#include "moelora/page_pool.h"

using namespace moelora;

namespace {

struct Args {
  int64_t pages = 32768;
  int64_t ops = 400000;
  uint64_t seed = 1;
  int64_t page_bytes = 4096;
};

Args parse_args(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s needs a value\n", flag.c_str());
      std::exit(2);
    }
    const long long value = std::atoll(argv[++i]);
    if (flag == "--pages") {
      args.pages = value;
    } else if (flag == "--ops") {
      args.ops = value;
    } else if (flag == "--seed") {
      args.seed = static_cast<uint64_t>(value);
    } else if (flag == "--page-bytes") {
      args.page_bytes = value;
    } else {
      std::fprintf(stderr, "unknown flag %s (use --pages --ops --seed --page-bytes)\n",
                   flag.c_str());
      std::exit(2);
    }
  }
  return args;
}

struct Case {
  const char* name;
  int num_adapters;
  double zipf_s;
  int max_running;
  int mean_kv_pages;  // mean pages a request's KV grows to
};

class ZipfSampler {
 public:
  ZipfSampler(int n, double s) : cdf_(static_cast<size_t>(n)) {
    double total = 0;
    for (int i = 0; i < n; ++i) total += 1.0 / std::pow(i + 1, s);
    double running = 0;
    for (int i = 0; i < n; ++i) cdf_[i] = (running += 1.0 / std::pow(i + 1, s) / total);
  }
  int operator()(std::mt19937_64& rng) {
    const double u = std::uniform_real_distribution<double>(0, 1)(rng);
    return static_cast<int>(std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin()) %
           static_cast<int>(cdf_.size());
  }

 private:
  std::vector<double> cdf_;
};

struct Request {
  uint64_t id;
  uint64_t adapter;
  int64_t kv_pages;
  int64_t target_pages;
};

struct Counters {
  int64_t ops = 0, adapter_loads = 0, load_failures = 0, preemptions = 0, finished = 0;
};

void run_case(const Args& args, const Case& c) {
  PagePool pool(make_host_arena(args.pages * args.page_bytes), args.page_bytes);
  std::mt19937_64 rng(args.seed);
  ZipfSampler pick_adapter(c.num_adapters, c.zipf_s);
  // Adapter sizes in pages, from ranks 8..64 of a mid-size MoE: proportional to rank.
  std::vector<int64_t> adapter_pages(static_cast<size_t>(c.num_adapters));
  const int64_t pages_per_rank8 = std::max<int64_t>(1, args.pages / 2048);
  for (auto& pages : adapter_pages) pages = pages_per_rank8 * (int64_t{1} << (rng() % 4));
  std::geometric_distribution<int64_t> kv_length(1.0 / c.mean_kv_pages);

  std::vector<int64_t> latencies;
  latencies.reserve(static_cast<size_t>(args.ops) + 16);
  Counters counters;
  const int64_t warmup_ops = args.ops / 10;
  auto timed = [&](auto&& call) {
    const auto start = std::chrono::steady_clock::now();
    auto result = call();
    const auto stop = std::chrono::steady_clock::now();
    // The first tenth warms caches and the allocator; it is replayed but not timed.
    if (counters.ops++ >= warmup_ops) {
      latencies.push_back(
          std::chrono::duration_cast<std::chrono::nanoseconds>(stop - start).count());
    }
    return result;
  };
  auto release = [&](const Request& r) {
    timed([&] { pool.free(kv_owner(r.id)); return 0; });
    timed([&] { pool.unpin(adapter_owner(r.adapter)); return 0; });
  };

  std::deque<Request> running;  // oldest first
  uint64_t next_request = 0;
  while (counters.ops < args.ops + warmup_ops) {
    const bool admit = static_cast<int>(running.size()) < c.max_running && rng() % 4 == 0;
    if (admit || running.empty()) {
      const auto adapter = static_cast<uint64_t>(pick_adapter(rng));
      timed([&] { pool.pin(adapter_owner(adapter)); return 0; });
      const int64_t want = adapter_pages[adapter];
      const int64_t have =
          static_cast<int64_t>(timed([&] { return pool.pages_of(adapter_owner(adapter)); }).size());
      if (have < want) {
        auto out = timed([&] {
          return pool.try_allocate(adapter_owner(adapter), want - have, Eviction::kIdleAdapters);
        });
        if (!out.ok) {  // the request waits; its pin is released
          ++counters.load_failures;
          timed([&] { pool.unpin(adapter_owner(adapter)); return 0; });
          if (!running.empty()) {
            release(running.back());
            running.pop_back();
            ++counters.preemptions;
          }
          continue;
        }
        ++counters.adapter_loads;
      }
      running.push_back({next_request++, adapter, 0, 1 + kv_length(rng)});
      continue;
    }
    // One decode step of a random running request: its KV may need one more page.
    const size_t index = rng() % running.size();
    Request& r = running[index];
    auto out = timed([&] { return pool.try_allocate(kv_owner(r.id), 1, Eviction::kIdleAdapters); });
    if (!out.ok) {
      release(running.back());  // preempt the youngest (recompute later)
      running.pop_back();
      ++counters.preemptions;
      continue;
    }
    timed([&] { pool.touch(adapter_owner(r.adapter)); return 0; });
    if (++r.kv_pages >= r.target_pages) {
      release(r);
      running.erase(running.begin() + static_cast<std::ptrdiff_t>(index));
      ++counters.finished;
    }
  }
  pool.check_invariants();
  const PoolStats stats = pool.stats();
  std::sort(latencies.begin(), latencies.end());
  const auto at = [&](double q) {
    return latencies[std::min(latencies.size() - 1, static_cast<size_t>(q * latencies.size()))];
  };
  std::printf(
      "{\"bench\":\"page_pool\",\"case\":\"%s\",\"pages\":%lld,\"page_bytes\":%lld,\"ops\":%lld,"
      "\"adapters\":%d,\"zipf_s\":%.2f,\"ns_per_op_median\":%lld,\"p99_ns\":%lld,"
      "\"max_ns\":%lld,\"evictions\":%lld,\"adapter_loads\":%lld,\"load_failures\":%lld,"
      "\"preemptions\":%lld,\"finished\":%lld,\"free_pages_end\":%lld,\"kv_pages_end\":%lld,"
      "\"adapter_pages_end\":%lld,\"seed\":%llu}\n",
      c.name, static_cast<long long>(args.pages), static_cast<long long>(args.page_bytes),
      static_cast<long long>(latencies.size()), c.num_adapters, c.zipf_s,
      static_cast<long long>(at(0.5)), static_cast<long long>(at(0.99)),
      static_cast<long long>(latencies.back()), static_cast<long long>(stats.evictions),
      static_cast<long long>(counters.adapter_loads),
      static_cast<long long>(counters.load_failures),
      static_cast<long long>(counters.preemptions), static_cast<long long>(counters.finished),
      static_cast<long long>(stats.free_pages), static_cast<long long>(stats.kv_pages),
      static_cast<long long>(stats.adapter_pages), static_cast<unsigned long long>(args.seed));
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  if (args.pages < 16 || args.ops < 1 || args.page_bytes <= 0 || args.page_bytes % 256 != 0) {
    std::fprintf(stderr, "need --pages >= 16, --ops >= 1, --page-bytes a multiple of 256\n");
    return 2;
  }
  const Case cases[] = {
      {"few_hot_adapters", 16, 1.2, 256, 64},
      {"many_cold_adapters", 512, 1.0, 256, 32},
      {"long_context", 64, 1.1, 64, 512},
  };
  for (const Case& c : cases) run_case(args, c);
  return 0;
}
