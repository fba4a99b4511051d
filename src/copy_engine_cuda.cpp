// The CUDA copy engine: dedicated non-blocking streams, one event per ticket. The regions of a
// submission are coalesced into maximal runs of adjacent regions; independent runs go to the
// driver as one cudaMemcpyBatchAsync per stream (a large submission is spread over several
// streams), with one cudaMemcpyAsync per run as the fallback where batches are unavailable.
// Also the pinned-host and device allocation helpers. Without CUDA this file provides the
// "no CUDA" answers of the same functions, and the (pure C++) run planning in both builds.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "copy_engine_internal.h"
#include "cuda_check.h"
#include "moelora/copy_engine.h"
#include "moelora/error.h"
#include "moelora/runtime.h"

namespace moelora {

// ---- run planning (both builds) --------------------------------------------------------------

namespace detail {

std::vector<CopyRegion> coalesce_copy_runs(const std::vector<CopyRegion>& regions) {
  std::vector<CopyRegion> runs;
  for (const CopyRegion& r : regions) {
    if (r.bytes == 0) continue;
    if (!runs.empty()) {
      CopyRegion& last = runs.back();
      if (static_cast<std::byte*>(last.dst) + last.bytes == r.dst &&
          static_cast<const std::byte*>(last.src) + last.bytes == r.src) {
        last.bytes += r.bytes;
        continue;
      }
    }
    runs.push_back(r);
  }
  return runs;
}

bool copy_runs_independent(const std::vector<CopyRegion>& runs) {
  struct Span {
    uintptr_t begin, end;
  };
  std::vector<Span> dsts;
  dsts.reserve(runs.size());
  for (const CopyRegion& r : runs) {
    if (r.bytes <= 0) continue;
    const auto begin = reinterpret_cast<uintptr_t>(r.dst);
    dsts.push_back({begin, begin + static_cast<uintptr_t>(r.bytes)});
  }
  std::sort(dsts.begin(), dsts.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < dsts.size(); ++i) {
    if (dsts[i].begin < dsts[i - 1].end) return false;  // two runs write the same bytes
  }
  // The destinations are disjoint and sorted, so their ends are sorted too: a source can only
  // overlap the last destination that begins before the source ends.
  for (const CopyRegion& r : runs) {
    if (r.bytes <= 0) continue;
    const auto begin = reinterpret_cast<uintptr_t>(r.src);
    const uintptr_t end = begin + static_cast<uintptr_t>(r.bytes);
    auto after = std::lower_bound(dsts.begin(), dsts.end(), end,
                                  [](const Span& d, uintptr_t value) { return d.begin < value; });
    if (after != dsts.begin() && std::prev(after)->end > begin) return false;  // reads a dst
  }
  return true;
}

std::vector<size_t> split_copy_runs(const std::vector<CopyRegion>& runs, int parts) {
  const size_t n = runs.size();
  std::vector<size_t> bounds = {0};
  if (n == 0) return bounds;
  const size_t groups = std::min(n, static_cast<size_t>(std::max(parts, 1)));
  int64_t total = 0;
  for (const CopyRegion& r : runs) total += r.bytes;
  int64_t done = 0;
  for (size_t i = 0; i + 1 < n && bounds.size() < groups; ++i) {
    done += runs[i].bytes;
    const size_t cut = bounds.size();             // the cut that would close group cut-1
    const size_t runs_left = n - (i + 1);         // runs after this one
    const size_t groups_left = groups - cut;      // groups still to fill after the cut
    const bool reached = static_cast<double>(done) * static_cast<double>(groups) >=
                         static_cast<double>(total) * static_cast<double>(cut);
    if (runs_left >= groups_left && (reached || runs_left == groups_left)) bounds.push_back(i + 1);
  }
  bounds.push_back(n);
  return bounds;
}

}  // namespace detail

#ifdef MOELORA_WITH_CUDA

namespace {

// Set once a driver answers that it has no batched copies: no engine of this process tries again.
std::atomic<bool> g_batches_unsupported{false};

// At most this many copies per cudaMemcpyBatchAsync call (no documented limit; a cap is cheap).
constexpr size_t kMaxBatchCopies = 4096;

// Restores the calling thread's current device when it goes out of scope.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    MOELORA_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) MOELORA_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

struct Event {
  explicit Event(int device) : device(device) {
    MOELORA_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  }
  ~Event() { cudaEventDestroy(event); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t event = nullptr;
  int device;
};

bool means_unsupported(cudaError_t status) {
  return status == cudaErrorNotSupported || status == cudaErrorCallRequiresNewerDriver ||
         status == cudaErrorNotYetImplemented;
}

class CudaCopyEngine final : public CopyEngine {
 public:
  CudaCopyEngine(int device_index, int num_streams, const detail::CudaCopyTuning& tuning)
      : device_(device_index), tuning_(tuning) {
    if (num_streams < 1) {
      throw InvalidArgument("num_streams must be >= 1, got " + std::to_string(num_streams));
    }
    if (tuning.split_streams < 0) {
      throw InvalidArgument("split_streams must be >= 0, got " +
                            std::to_string(tuning.split_streams));
    }
    DeviceGuard guard(device_);
    try {
      for (int i = 0; i < num_streams; ++i) {
        cudaStream_t stream = nullptr;
        MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        streams_.push_back(stream);
        joins_.push_back(std::make_unique<Event>(device_));
      }
    } catch (...) {
      release_streams();
      throw;
    }
  }

  ~CudaCopyEngine() override {
    // A submitted copy always completes: drain the streams before destroying them.
    DeviceGuard guard(device_);
    release_streams();
  }

  CopyTicket submit(std::vector<CopyRegion> regions) override {
    for (size_t i = 0; i < regions.size(); ++i) {
      if (regions[i].bytes < 0 || (regions[i].bytes > 0 && (!regions[i].dst || !regions[i].src))) {
        throw InvalidArgument("copy region " + std::to_string(i) + " is invalid");
      }
    }
    const std::vector<CopyRegion> runs = detail::coalesce_copy_runs(regions);
    const bool independent = runs.size() < 2 || detail::copy_runs_independent(runs);
    int64_t total_bytes = 0;
    for (const CopyRegion& r : runs) total_bytes += r.bytes;

    // Submissions queue one after another (the join events are shared); tickets are looked up
    // under their own mutex, so that a step's readiness checks never wait for a submission's
    // driver calls.
    std::lock_guard<std::mutex> lock(submit_mutex_);
    DeviceGuard guard(device_);
    const size_t first = next_stream_;
    next_stream_ = (next_stream_ + 1) % streams_.size();
    size_t parts = 1;
    if (independent && total_bytes >= tuning_.split_min_bytes) {
      parts = tuning_.split_streams == 0 ? streams_.size()
                                         : std::min(streams_.size(),
                                                    static_cast<size_t>(tuning_.split_streams));
    }
    const std::vector<size_t> bounds = detail::split_copy_runs(runs, static_cast<int>(parts));
    const size_t groups = bounds.size() - 1;  // 0 when there is nothing to copy
    ++stats_.submits;
    if (!independent) ++stats_.ordered_submits;
    if (groups > 1) ++stats_.split_submits;
    for (size_t g = 0; g < groups; ++g) {
      copy_group(runs, bounds[g], bounds[g + 1], streams_[(first + g) % streams_.size()],
                 independent);
    }
    // The ticket's event lives on the first stream: the others join it there.
    cudaStream_t stream = streams_[first];
    for (size_t g = 1; g < groups; ++g) {
      const size_t other = (first + g) % streams_.size();
      MOELORA_CUDA_CHECK(cudaEventRecord(joins_[other]->event, streams_[other]));
      MOELORA_CUDA_CHECK(cudaStreamWaitEvent(stream, joins_[other]->event, 0));
    }
    auto event = std::make_shared<Event>(device_);
    MOELORA_CUDA_CHECK(cudaEventRecord(event->event, stream));
    std::lock_guard<std::mutex> tickets(tickets_mutex_);
    CopyTicket ticket = ++last_submitted_;
    pending_[ticket] = std::move(event);
    return ticket;
  }

  bool is_done(CopyTicket ticket) override {
    check_not_capturing("CopyEngine::is_done");
    std::shared_ptr<Event> event = find(ticket);
    if (!event) return true;
    cudaError_t status = cudaEventQuery(event->event);
    if (status == cudaErrorNotReady) return false;
    MOELORA_CUDA_CHECK(status);
    retire(ticket);
    return true;
  }

  void wait(CopyTicket ticket) override {
    check_not_capturing("CopyEngine::wait");
    std::shared_ptr<Event> event = find(ticket);
    if (!event) return;
    MOELORA_CUDA_CHECK(cudaEventSynchronize(event->event));
    retire(ticket);
  }

  void make_stream_wait(CopyTicket ticket, void* cuda_stream) override {
    std::shared_ptr<Event> event = find(ticket);
    if (!event) return;
    // A capturing stream may not wait on an event recorded outside its capture.
    check_not_capturing("CopyEngine::make_stream_wait on a copy in flight");
    MOELORA_CUDA_CHECK(
        cudaStreamWaitEvent(static_cast<cudaStream_t>(cuda_stream), event->event, 0));
  }

  void synchronize() override {
    check_not_capturing("CopyEngine::synchronize");
    DeviceGuard guard(device_);
    for (cudaStream_t stream : streams_) MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::lock_guard<std::mutex> lock(tickets_mutex_);
    pending_.clear();
  }

  DeviceKind device() const override { return DeviceKind::kCUDA; }

  detail::CudaCopyStats stats() const {
    std::lock_guard<std::mutex> lock(submit_mutex_);
    detail::CudaCopyStats s = stats_;
    s.batches_enabled = batches_enabled();
    return s;
  }

 private:
  void release_streams() noexcept {
    for (cudaStream_t stream : streams_) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
    streams_.clear();
    joins_.clear();
  }

  bool batches_enabled() const {
    return detail::cuda_batch_copy_compiled() && tuning_.batched && !batches_given_up_ &&
           !g_batches_unsupported.load(std::memory_order_relaxed);
  }

  // Copies runs[begin, end) on `stream`: batched where allowed, the rest one call per run.
  // The caller holds submit_mutex_.
  void copy_group(const std::vector<CopyRegion>& runs, size_t begin, size_t end,
                  cudaStream_t stream, bool independent) {
    size_t next = begin;
    if (independent && end - begin >= 2 && batches_enabled()) {
      next = copy_batched(runs, begin, end, stream);
    }
    for (size_t i = next; i < end; ++i) {
      const CopyRegion& r = runs[i];
      MOELORA_CUDA_CHECK(cudaMemcpyAsync(r.dst, r.src, static_cast<size_t>(r.bytes),
                                         cudaMemcpyDefault, stream));
      ++stats_.per_run_calls;
    }
  }

  // Queues runs[begin, end) as batches; returns the first run that still needs copying (end
  // when every batch was accepted). When the driver refuses a batch, batches are given up (for
  // the process when it says "not supported", else for this engine) and the caller copies the
  // refused runs one by one. A refused call may have queued part of its copies already;
  // copying those again is harmless since the runs are independent.
  size_t copy_batched(const std::vector<CopyRegion>& runs, size_t begin, size_t end,
                      cudaStream_t stream) {
#if CUDART_VERSION >= 13000
    const size_t count = end - begin;
    std::vector<void*> dsts(count), srcs(count);
    std::vector<size_t> sizes(count);
    int64_t largest = 0;
    for (size_t i = 0; i < count; ++i) {
      const CopyRegion& r = runs[begin + i];
      dsts[i] = r.dst;
      srcs[i] = const_cast<void*>(r.src);
      sizes[i] = static_cast<size_t>(r.bytes);
      largest = std::max(largest, r.bytes);
    }
    cudaMemcpyAttributes attrs{};  // no location hints: they only apply to managed memory
    attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attrs.flags = largest <= tuning_.overlap_hint_max_bytes
                      ? cudaMemcpyFlagPreferOverlapWithCompute
                      : cudaMemcpyFlagDefault;
    for (size_t at = 0; at < count; at += kMaxBatchCopies) {
      const size_t n = std::min(kMaxBatchCopies, count - at);
      size_t attrs_index = 0;
      cudaError_t status = cudaErrorNotSupported;
      if (!tuning_.simulate_batch_unsupported) {
        status = cudaMemcpyBatchAsync(dsts.data() + at, srcs.data() + at, sizes.data() + at, n,
                                      &attrs, &attrs_index, 1, stream);
      }
      if (status != cudaSuccess) {
        if (!tuning_.simulate_batch_unsupported) cudaGetLastError();  // not sticky: clear it
        give_up_batches(status);
        return begin + at;
      }
      ++stats_.batch_calls;
      stats_.batched_runs += static_cast<int64_t>(n);
    }
    return end;
#else
    return begin;
#endif
  }

  void give_up_batches(cudaError_t status) {
    ++stats_.batch_fallbacks;
    batches_given_up_ = true;
    const bool unsupported = means_unsupported(status);
    if (unsupported && !tuning_.simulate_batch_unsupported) g_batches_unsupported = true;
    stats_.batch_error =
        std::string("cudaMemcpyBatchAsync failed: ") + cudaGetErrorString(status) +
        (tuning_.simulate_batch_unsupported ? " (simulated)" : "") +
        (unsupported ? "; every engine of this process copies one run per cudaMemcpyAsync now"
                     : "; this engine copies one run per cudaMemcpyAsync now");
  }

  // Events are shared so that a waiter keeps its event alive while another thread retires it.
  std::shared_ptr<Event> find(CopyTicket ticket) {
    std::lock_guard<std::mutex> lock(tickets_mutex_);
    if (ticket > last_submitted_) {
      throw InvalidArgument("copy ticket " + std::to_string(ticket) + " was never submitted");
    }
    auto it = pending_.find(ticket);
    return it == pending_.end() ? nullptr : it->second;
  }

  void retire(CopyTicket ticket) {
    std::lock_guard<std::mutex> lock(tickets_mutex_);
    pending_.erase(ticket);
  }

  int device_;
  detail::CudaCopyTuning tuning_;
  std::vector<cudaStream_t> streams_;
  std::vector<std::unique_ptr<Event>> joins_;  // [stream]: joins a split submission's streams
  mutable std::mutex submit_mutex_;  // streams, joins, batches_given_up_, stats_
  size_t next_stream_ = 0;
  bool batches_given_up_ = false;
  detail::CudaCopyStats stats_;
  std::mutex tickets_mutex_;  // a leaf: last_submitted_, pending_
  CopyTicket last_submitted_ = 0;
  std::map<CopyTicket, std::shared_ptr<Event>> pending_;
};

}  // namespace

std::unique_ptr<CopyEngine> make_cuda_copy_engine(int device_index, int num_streams) {
  return detail::make_cuda_copy_engine_tuned(device_index, num_streams, detail::CudaCopyTuning{});
}

namespace detail {

std::unique_ptr<CopyEngine> make_cuda_copy_engine_tuned(int device_index, int num_streams,
                                                        const CudaCopyTuning& tuning) {
  if (!cuda_available()) throw CudaError("make_cuda_copy_engine: no usable CUDA device");
  if (device_index < 0 || device_index >= cuda_device_count()) {
    throw CudaError("make_cuda_copy_engine: no CUDA device " + std::to_string(device_index));
  }
  return std::make_unique<CudaCopyEngine>(device_index, num_streams, tuning);
}

CudaCopyStats cuda_copy_stats(const CopyEngine& engine) {
  const auto* cuda = dynamic_cast<const CudaCopyEngine*>(&engine);
  if (!cuda) throw InvalidArgument("cuda_copy_stats: not a CUDA copy engine");
  return cuda->stats();
}

bool cuda_batch_copy_compiled() { return CUDART_VERSION >= 13000; }

void* try_pinned_host_alloc(int64_t bytes) {
  if (!cuda_available()) return nullptr;
  void* ptr = nullptr;
  if (cudaHostAlloc(&ptr, static_cast<size_t>(bytes), cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are not confused
    return nullptr;
  }
  return ptr;
}

void pinned_host_free(void* ptr) noexcept { cudaFreeHost(ptr); }

bool try_host_register(void* ptr, int64_t bytes) {
  if (!cuda_available()) return false;
  if (cudaHostRegister(ptr, static_cast<size_t>(bytes), cudaHostRegisterPortable) !=
      cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

void host_unregister(void* ptr) noexcept { cudaHostUnregister(ptr); }

void relax_capture_mode_of_this_thread() noexcept {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) cudaGetLastError();
}

void* device_alloc(int64_t bytes, int device_index) {
  DeviceGuard guard(device_index);
  void* ptr = nullptr;
  MOELORA_CUDA_CHECK(cudaMalloc(&ptr, static_cast<size_t>(bytes)));
  return ptr;
}

void device_free(void* ptr, int device_index) noexcept {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device_index);
  cudaFree(ptr);
  cudaSetDevice(previous);
}

}  // namespace detail

#else  // !MOELORA_WITH_CUDA

std::unique_ptr<CopyEngine> make_cuda_copy_engine(int device_index, int num_streams) {
  throw CudaError("make_cuda_copy_engine: libmoelora was built without CUDA");
}

namespace detail {

std::unique_ptr<CopyEngine> make_cuda_copy_engine_tuned(int device_index, int num_streams,
                                                        const CudaCopyTuning& tuning) {
  throw CudaError("make_cuda_copy_engine: libmoelora was built without CUDA");
}
CudaCopyStats cuda_copy_stats(const CopyEngine& engine) {
  throw InvalidArgument("cuda_copy_stats: not a CUDA copy engine");
}
bool cuda_batch_copy_compiled() { return false; }

void* try_pinned_host_alloc(int64_t bytes) { return nullptr; }
void pinned_host_free(void* ptr) noexcept {}
bool try_host_register(void* ptr, int64_t bytes) { return false; }
void host_unregister(void* ptr) noexcept {}
void relax_capture_mode_of_this_thread() noexcept {}
void* device_alloc(int64_t bytes, int device_index) {
  throw CudaError("device_alloc: libmoelora was built without CUDA");
}
void device_free(void* ptr, int device_index) noexcept {}

}  // namespace detail

#endif  // MOELORA_WITH_CUDA

}  // namespace moelora
