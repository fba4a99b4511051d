// Host -> device bandwidth of adapter loads: the packed pages of an adapter copied into pages
// scattered over the arena (runs of 1-8 consecutive pages, as the pool hands them out), through
// the copy engine, against one plain copy of the same bytes measured in the same run (memcpy on
// the CPU; one cudaMemcpyAsync of the whole pinned buffer on the GPU). One JSON line per case.
// On the GPU every mode of the CUDA engine is measured in the same process, one line each
// ("mode"): plain (the baseline itself), per_run (one cudaMemcpyAsync per run, one stream: the
// engine before batching), per_run_split (the same, the runs spread over the engine's streams),
// batched (one cudaMemcpyBatchAsync, one stream), batched_hint (with
// cudaMemcpyFlagPreferOverlapWithCompute), batched_split (the engine's defaults), and
// batched_split_hint. After each mode the arena is read back and compared ("verified").
//   bench_adapter_copy --mib 256 --device cpu|cuda --repeats 10 [--page-kib 64] [--streams 2]
//                      [--modes per_run,batched_split]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "copy_engine_internal.h"
#include "moelora/arena.h"
#include "moelora/copy_engine.h"
#include "moelora/error.h"

using namespace moelora;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename Fn>
std::vector<double> time_runs(int repeats, Fn&& fn) {
  fn();  // warm-up: first-touch page faults, stream creation
  std::vector<double> seconds;
  for (int i = 0; i < repeats; ++i) {
    auto start = std::chrono::steady_clock::now();
    fn();
    seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return seconds;
}

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += (static_cast<unsigned char>(c) < 0x20) ? ' ' : c;
  }
  return out + "\"";
}

struct Mode {
  std::string name;
  detail::CudaCopyTuning tuning;
};

std::vector<Mode> all_cuda_modes() {
  const detail::CudaCopyTuning defaults;
  std::vector<Mode> modes;
  detail::CudaCopyTuning t = defaults;
  t.batched = false;
  t.split_streams = 1;
  modes.push_back({"plain", t});  // the baseline: one region, one cudaMemcpyAsync
  modes.push_back({"per_run", t});
  t.split_streams = 0;
  modes.push_back({"per_run_split", t});
  t = defaults;
  t.split_streams = 1;
  modes.push_back({"batched", t});
  t.overlap_hint_max_bytes = std::numeric_limits<int64_t>::max();
  modes.push_back({"batched_hint", t});
  modes.push_back({"batched_split", defaults});
  t = defaults;
  t.overlap_hint_max_bytes = std::numeric_limits<int64_t>::max();
  modes.push_back({"batched_split_hint", t});
  return modes;
}

bool same_tuning(const detail::CudaCopyTuning& a, const detail::CudaCopyTuning& b) {
  return a.batched == b.batched && a.split_streams == b.split_streams &&
         a.split_min_bytes == b.split_min_bytes &&
         a.overlap_hint_max_bytes == b.overlap_hint_max_bytes &&
         a.simulate_batch_unsupported == b.simulate_batch_unsupported;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t mib = 256;
  std::string device = "cpu";
  int repeats = 10;
  int64_t page_kib = 64;
  int streams = 2;
  std::string mode_list;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--mib") mib = std::stoll(next());
    else if (arg == "--device") device = next();
    else if (arg == "--repeats") repeats = std::stoi(next());
    else if (arg == "--page-kib") page_kib = std::stoll(next());
    else if (arg == "--streams") streams = std::stoi(next());
    else if (arg == "--modes") mode_list = next();
    else {
      std::fprintf(stderr,
                   "usage: %s [--mib N] [--device cpu|cuda] [--repeats N] [--page-kib N] "
                   "[--streams N] [--modes plain,per_run,per_run_split,batched,batched_hint,"
                   "batched_split,batched_split_hint]\n",
                   argv[0]);
      return 2;
    }
  }
  if (device != "cpu" && device != "cuda") {
    std::fprintf(stderr, "--device must be cpu or cuda\n");
    return 2;
  }
  if (mib < 1 || page_kib < 1 || repeats < 1 || streams < 1) {
    std::fprintf(stderr, "--mib, --page-kib, --repeats and --streams must be >= 1\n");
    return 2;
  }
  std::vector<Mode> modes;
  if (device == "cuda") {
    for (const Mode& m : all_cuda_modes()) {
      const std::string wanted = "," + mode_list + ",";
      if (mode_list.empty() || wanted.find("," + m.name + ",") != std::string::npos) {
        modes.push_back(m);
      }
    }
    if (modes.empty()) {
      std::fprintf(stderr, "--modes names no known mode\n");
      return 2;
    }
  }
  try {
    const int64_t bytes = mib << 20;
    const int64_t page_bytes = page_kib << 10;
    const int64_t pages = bytes / page_bytes;
    const int64_t moved_bytes = pages * page_bytes;
    std::unique_ptr<Arena> arena =
        device == "cuda" ? make_cuda_arena(bytes, 0) : make_host_arena(bytes);
    HostBuffer packed(bytes, /*try_pinned=*/true);
    // Every 8-byte word distinct, so a byte copied to the wrong place is caught.
    for (int64_t i = 0; i + 8 <= bytes; i += 8) {
      const uint64_t word = static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull + 1;
      std::memcpy(packed.data() + i, &word, 8);
    }

    // Destination pages: the arena cut into runs of 1-8 pages, runs shuffled.
    std::mt19937 rng(1234);
    std::vector<std::pair<int64_t, int64_t>> runs;
    for (int64_t p = 0; p < pages;) {
      int64_t len = std::min<int64_t>(1 + rng() % 8, pages - p);
      runs.push_back({p, len});
      p += len;
    }
    std::shuffle(runs.begin(), runs.end(), rng);
    std::vector<CopyRegion> regions;
    int64_t src_page = 0;
    for (auto [first, len] : runs) {
      regions.push_back({arena->base() + first * page_bytes, packed.data() + src_page * page_bytes,
                         len * page_bytes});
      src_page += len;
    }
    const std::vector<CopyRegion> plain = {{arena->base(), packed.data(), moved_bytes}};
    const double moved = static_cast<double>(moved_bytes);

    auto print_line = [&](const std::string& mode, size_t nregions, double load_s, double base_s,
                          const std::string& extra) {
      const double load_gbps = moved / load_s / 1e9;
      const double base_gbps = moved / base_s / 1e9;
      std::printf(
          "{\"bench\": \"adapter_copy\", \"device\": \"%s\", \"mode\": \"%s\", \"mib\": %lld, "
          "\"page_kib\": %lld, \"regions\": %zu, \"pinned\": %s, \"repeats\": %d, "
          "\"median_ms\": %.4f, \"gbps\": %.3f, \"baseline\": \"%s\", "
          "\"baseline_median_ms\": %.4f, \"baseline_gbps\": %.3f, "
          "\"fraction_of_baseline\": %.3f%s}\n",
          device.c_str(), mode.c_str(), static_cast<long long>(mib),
          static_cast<long long>(page_kib), nregions, packed.pinned() ? "true" : "false", repeats,
          load_s * 1e3, load_gbps, device == "cuda" ? "cudaMemcpyAsync" : "memcpy", base_s * 1e3,
          base_gbps, load_gbps / base_gbps, extra.c_str());
      std::fflush(stdout);
    };

    if (device == "cpu") {
      std::unique_ptr<CopyEngine> engine = make_cpu_copy_engine();
      auto load = time_runs(repeats, [&] { engine->wait(engine->submit(regions)); });
      auto baseline = time_runs(repeats, [&] {
        std::memcpy(arena->base(), packed.data(), static_cast<size_t>(moved_bytes));
      });
      print_line("engine", regions.size(), median(load), median(baseline), "");
      return 0;
    }

    // GPU: the baseline first, then every mode, each on a fresh engine.
    detail::CudaCopyTuning plain_tuning;
    plain_tuning.batched = false;
    plain_tuning.split_streams = 1;
    std::unique_ptr<CopyEngine> helper = detail::make_cuda_copy_engine_tuned(0, 1, plain_tuning);
    auto baseline = time_runs(repeats, [&] { helper->wait(helper->submit(plain)); });
    const double base_s = median(baseline);
    HostBuffer zeros(bytes, /*try_pinned=*/true);
    std::memset(zeros.data(), 0, static_cast<size_t>(bytes));
    HostBuffer check(bytes, /*try_pinned=*/true);
    const detail::CudaCopyTuning defaults;
    int failures = 0;
    for (const Mode& mode : modes) {
      const bool is_plain = mode.name == "plain";
      const std::vector<CopyRegion>& load_regions = is_plain ? plain : regions;
      helper->wait(helper->submit({{arena->base(), zeros.data(), bytes}}));
      std::unique_ptr<CopyEngine> engine =
          detail::make_cuda_copy_engine_tuned(0, streams, mode.tuning);
      auto load = time_runs(repeats, [&] { engine->wait(engine->submit(load_regions)); });
      helper->wait(helper->submit({{check.data(), arena->base(), bytes}}));
      bool verified = true;
      for (const CopyRegion& r : load_regions) {
        const int64_t offset = static_cast<std::byte*>(r.dst) - arena->base();
        if (std::memcmp(check.data() + offset, r.src, static_cast<size_t>(r.bytes)) != 0) {
          verified = false;
        }
      }
      if (!verified) ++failures;
      const detail::CudaCopyStats stats = detail::cuda_copy_stats(*engine);
      std::ostringstream extra;
      extra << ", \"streams\": " << streams
            << ", \"engine_default\": " << (same_tuning(mode.tuning, defaults) ? "true" : "false")
            << ", \"verified\": " << (verified ? "true" : "false")
            << ", \"driver_calls_per_load\": "
            << static_cast<double>(stats.batch_calls + stats.per_run_calls) /
                   static_cast<double>(std::max<int64_t>(stats.submits, 1))
            << ", \"batch_calls\": " << stats.batch_calls
            << ", \"per_run_calls\": " << stats.per_run_calls
            << ", \"split_loads\": " << stats.split_submits
            << ", \"batch_fallbacks\": " << stats.batch_fallbacks
            << ", \"batch_error\": " << json_string(stats.batch_error);
      print_line(mode.name, load_regions.size(), median(load), base_s, extra.str());
    }
    if (failures > 0) {
      std::fprintf(stderr, "bench_adapter_copy: %d mode(s) copied wrong bytes\n", failures);
      return 1;
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_adapter_copy: %s\n", e.what());
    return 1;
  }
  return 0;
}
