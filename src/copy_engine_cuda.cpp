// The CUDA copy engine: dedicated non-blocking streams, one cudaMemcpyAsync per maximal run of
// adjacent regions, one event per ticket. Also the pinned-host and device allocation helpers.
// Without CUDA this file provides the "no CUDA" answers of the same functions.
#include <cstdint>
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

#ifdef MOELORA_WITH_CUDA

namespace {

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
  cudaEvent_t event = nullptr;
  int device;
};

class CudaCopyEngine final : public CopyEngine {
 public:
  CudaCopyEngine(int device_index, int num_streams) : device_(device_index) {
    if (num_streams < 1) {
      throw InvalidArgument("num_streams must be >= 1, got " + std::to_string(num_streams));
    }
    DeviceGuard guard(device_);
    for (int i = 0; i < num_streams; ++i) {
      cudaStream_t stream = nullptr;
      MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      streams_.push_back(stream);
    }
  }

  ~CudaCopyEngine() override {
    // A submitted copy always completes: drain the streams before destroying them.
    DeviceGuard guard(device_);
    for (cudaStream_t stream : streams_) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
  }

  CopyTicket submit(std::vector<CopyRegion> regions) override {
    for (size_t i = 0; i < regions.size(); ++i) {
      if (regions[i].bytes < 0 || (regions[i].bytes > 0 && (!regions[i].dst || !regions[i].src))) {
        throw InvalidArgument("copy region " + std::to_string(i) + " is invalid");
      }
    }
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
    std::lock_guard<std::mutex> lock(mutex_);
    DeviceGuard guard(device_);
    cudaStream_t stream = streams_[next_stream_];
    next_stream_ = (next_stream_ + 1) % streams_.size();
    for (const CopyRegion& r : runs) {
      MOELORA_CUDA_CHECK(cudaMemcpyAsync(r.dst, r.src, static_cast<size_t>(r.bytes),
                                         cudaMemcpyDefault, stream));
    }
    auto event = std::make_shared<Event>(device_);
    MOELORA_CUDA_CHECK(cudaEventRecord(event->event, stream));
    CopyTicket ticket = ++last_submitted_;
    pending_[ticket] = std::move(event);
    return ticket;
  }

  bool is_done(CopyTicket ticket) override {
    std::shared_ptr<Event> event = find(ticket);
    if (!event) return true;
    cudaError_t status = cudaEventQuery(event->event);
    if (status == cudaErrorNotReady) return false;
    MOELORA_CUDA_CHECK(status);
    retire(ticket);
    return true;
  }

  void wait(CopyTicket ticket) override {
    std::shared_ptr<Event> event = find(ticket);
    if (!event) return;
    MOELORA_CUDA_CHECK(cudaEventSynchronize(event->event));
    retire(ticket);
  }

  void make_stream_wait(CopyTicket ticket, void* cuda_stream) override {
    std::shared_ptr<Event> event = find(ticket);
    if (!event) return;
    MOELORA_CUDA_CHECK(
        cudaStreamWaitEvent(static_cast<cudaStream_t>(cuda_stream), event->event, 0));
  }

  void synchronize() override {
    DeviceGuard guard(device_);
    for (cudaStream_t stream : streams_) MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.clear();
  }

  DeviceKind device() const override { return DeviceKind::kCUDA; }

 private:
  // Events are shared so that a waiter keeps its event alive while another thread retires it.
  std::shared_ptr<Event> find(CopyTicket ticket) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (ticket > last_submitted_) {
      throw InvalidArgument("copy ticket " + std::to_string(ticket) + " was never submitted");
    }
    auto it = pending_.find(ticket);
    return it == pending_.end() ? nullptr : it->second;
  }

  void retire(CopyTicket ticket) {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.erase(ticket);
  }

  int device_;
  std::vector<cudaStream_t> streams_;
  std::mutex mutex_;
  size_t next_stream_ = 0;
  CopyTicket last_submitted_ = 0;
  std::map<CopyTicket, std::shared_ptr<Event>> pending_;
};

}  // namespace

std::unique_ptr<CopyEngine> make_cuda_copy_engine(int device_index, int num_streams) {
  if (!cuda_available()) throw CudaError("make_cuda_copy_engine: no usable CUDA device");
  if (device_index < 0 || device_index >= cuda_device_count()) {
    throw CudaError("make_cuda_copy_engine: no CUDA device " + std::to_string(device_index));
  }
  return std::make_unique<CudaCopyEngine>(device_index, num_streams);
}

namespace detail {

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

void* try_pinned_host_alloc(int64_t bytes) { return nullptr; }
void pinned_host_free(void* ptr) noexcept {}
void* device_alloc(int64_t bytes, int device_index) {
  throw CudaError("device_alloc: libmoelora was built without CUDA");
}
void device_free(void* ptr, int device_index) noexcept {}

}  // namespace detail

#endif  // MOELORA_WITH_CUDA

}  // namespace moelora
