// Internal: a plain std::thread split of [0, count) into contiguous chunks for the CPU kernels.
// Small problems run inline (thread start-up costs tens of microseconds). The body must not
// throw: kernels validate tensor contents before they split the work.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace moelora::cpu {

// Calls body(begin, end) over disjoint chunks covering [0, count). `work` estimates the total
// cost in multiply-adds; below ~1M the loop runs on the calling thread.
template <typename Body>
void parallel_for(int64_t count, int64_t work, Body&& body) {
  constexpr int64_t kMinWorkPerThread = int64_t{1} << 20;
  int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
  int64_t threads = std::min({hardware, count, std::max<int64_t>(1, work / kMinWorkPerThread)});
  if (threads <= 1) {
    if (count > 0) body(int64_t{0}, count);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  int64_t chunk = (count + threads - 1) / threads;
  for (int64_t begin = chunk; begin < count; begin += chunk) {
    int64_t end = std::min(count, begin + chunk);
    workers.emplace_back([&body, begin, end] { body(begin, end); });
  }
  body(int64_t{0}, std::min(count, chunk));
  for (auto& worker : workers) worker.join();
}

}  // namespace moelora::cpu
