// Host -> device bandwidth of adapter loads: the packed pages of an adapter copied into pages
// scattered over the arena (runs of 1-8 consecutive pages, as the pool hands them out), through
// the copy engine, against one plain copy of the same bytes measured in the same run (memcpy on
// the CPU; one cudaMemcpyAsync of the whole pinned buffer on the GPU). One JSON line per case.
//   bench_adapter_copy --mib 256 --device cpu|cuda --repeats 10
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

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

}  // namespace

int main(int argc, char** argv) {
  int64_t mib = 256;
  std::string device = "cpu";
  int repeats = 10;
  int64_t page_kib = 64;
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
    else {
      std::fprintf(stderr, "usage: %s [--mib N] [--device cpu|cuda] [--repeats N] [--page-kib N]\n",
                   argv[0]);
      return 2;
    }
  }
  if (device != "cpu" && device != "cuda") {
    std::fprintf(stderr, "--device must be cpu or cuda\n");
    return 2;
  }
  try {
    const int64_t bytes = mib << 20;
    const int64_t page_bytes = page_kib << 10;
    const int64_t pages = bytes / page_bytes;
    std::unique_ptr<CopyEngine> engine =
        device == "cuda" ? make_cuda_copy_engine(0, 2) : make_cpu_copy_engine();
    std::unique_ptr<Arena> arena =
        device == "cuda" ? make_cuda_arena(bytes, 0) : make_host_arena(bytes);
    HostBuffer packed(bytes, /*try_pinned=*/true);
    for (int64_t i = 0; i < bytes; i += 4096) packed.data()[i] = std::byte(i / 4096 % 251);

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

    auto load = time_runs(repeats, [&] { engine->wait(engine->submit(regions)); });
    std::vector<double> baseline;
    if (device == "cuda") {
      baseline = time_runs(
          repeats, [&] { engine->wait(engine->submit({{arena->base(), packed.data(), pages * page_bytes}})); });
    } else {
      baseline = time_runs(repeats, [&] {
        std::memcpy(arena->base(), packed.data(), static_cast<size_t>(pages * page_bytes));
      });
    }
    const double moved = static_cast<double>(pages * page_bytes);
    const double load_gbps = moved / median(load) / 1e9;
    const double base_gbps = moved / median(baseline) / 1e9;
    std::printf(
        "{\"bench\": \"adapter_copy\", \"device\": \"%s\", \"mib\": %lld, \"page_kib\": %lld, "
        "\"regions\": %zu, \"pinned\": %s, \"repeats\": %d, \"median_ms\": %.4f, "
        "\"gbps\": %.3f, \"baseline\": \"%s\", \"baseline_median_ms\": %.4f, "
        "\"baseline_gbps\": %.3f, \"fraction_of_baseline\": %.3f}\n",
        device.c_str(), static_cast<long long>(mib), static_cast<long long>(page_kib),
        regions.size(), packed.pinned() ? "true" : "false", repeats, median(load) * 1e3,
        load_gbps, device == "cuda" ? "cudaMemcpyAsync" : "memcpy", median(baseline) * 1e3,
        base_gbps, load_gbps / base_gbps);
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_adapter_copy: %s\n", e.what());
    return 1;
  }
  return 0;
}
