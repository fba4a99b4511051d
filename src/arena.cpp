// Arenas: the one block of memory each page pool divides into pages. Host arenas are 4 KiB
// aligned so that pages of a multiple of 256 bytes stay aligned for 16-byte vector loads and so
// that page-locking (cudaHostAlloc) covers whole OS pages.
#include "moelora/arena.h"

#include <cstdlib>
#include <string>

#include "moelora/error.h"
#include "moelora/runtime.h"

#ifdef MOELORA_WITH_CUDA
#include "cuda_check.h"
#endif

namespace moelora {
namespace {

constexpr int64_t kHostAlignment = 4096;

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

void check_arena_bytes(int64_t bytes, const char* what) {
  if (bytes <= 0) {
    throw InvalidArgument(std::string(what) + ": bytes must be positive, got " +
                          std::to_string(bytes));
  }
}

class HostArena final : public Arena {
 public:
  HostArena(int64_t bytes, bool pinned) : bytes_(bytes) {
    const int64_t reserved = round_up(bytes, kHostAlignment);
#ifdef MOELORA_WITH_CUDA
    if (pinned && cuda_available()) {
      void* memory = nullptr;
      MOELORA_CUDA_CHECK(cudaHostAlloc(&memory, static_cast<size_t>(reserved),
                                       cudaHostAllocDefault));
      base_ = static_cast<std::byte*>(memory);
      pinned_ = true;
      return;
    }
#endif
    base_ = static_cast<std::byte*>(
        std::aligned_alloc(static_cast<size_t>(kHostAlignment), static_cast<size_t>(reserved)));
    if (base_ == nullptr) {
      throw PoolExhausted("host arena: could not allocate " + std::to_string(reserved) + " bytes",
                          reserved, 0);
    }
  }
  ~HostArena() override {
#ifdef MOELORA_WITH_CUDA
    if (pinned_) {
      cudaFreeHost(base_);  // no throw from a destructor; a failure here leaks nothing we can fix
      return;
    }
#endif
    std::free(base_);
  }
  std::byte* base() const override { return base_; }
  int64_t bytes() const override { return bytes_; }
  DeviceKind device() const override { return DeviceKind::kCPU; }
  int device_index() const override { return 0; }

 private:
  std::byte* base_ = nullptr;
  int64_t bytes_;
  bool pinned_ = false;
};

#ifdef MOELORA_WITH_CUDA
class CudaArena final : public Arena {
 public:
  CudaArena(int64_t bytes, int device_index) : bytes_(bytes), device_index_(device_index) {
    int previous = 0;
    MOELORA_CUDA_CHECK(cudaGetDevice(&previous));
    MOELORA_CUDA_CHECK(cudaSetDevice(device_index));
    void* memory = nullptr;
    const cudaError_t status = cudaMalloc(&memory, static_cast<size_t>(bytes));
    cudaSetDevice(previous);
    if (status != cudaSuccess) {
      cudaGetLastError();
      throw CudaError("cuda arena: cudaMalloc of " + std::to_string(bytes) + " bytes on GPU " +
                      std::to_string(device_index) + " failed: " + cudaGetErrorString(status));
    }
    base_ = static_cast<std::byte*>(memory);
  }
  ~CudaArena() override { cudaFree(base_); }
  std::byte* base() const override { return base_; }
  int64_t bytes() const override { return bytes_; }
  DeviceKind device() const override { return DeviceKind::kCUDA; }
  int device_index() const override { return device_index_; }

 private:
  std::byte* base_ = nullptr;
  int64_t bytes_;
  int device_index_;
};
#endif

class ExternalArena final : public Arena {
 public:
  ExternalArena(std::byte* base, int64_t bytes, DeviceKind device, int device_index)
      : base_(base), bytes_(bytes), device_(device), device_index_(device_index) {}
  std::byte* base() const override { return base_; }
  int64_t bytes() const override { return bytes_; }
  DeviceKind device() const override { return device_; }
  int device_index() const override { return device_index_; }

 private:
  std::byte* base_;
  int64_t bytes_;
  DeviceKind device_;
  int device_index_;
};

void check_cuda_device(int device_index, const char* what) {
  const int count = cuda_device_count();
  if (count == 0) {
    throw CudaError(std::string(what) + ": no CUDA device is available" +
                    (built_with_cuda() ? "" : " (libmoelora was built without CUDA)"));
  }
  if (device_index < 0 || device_index >= count) {
    throw InvalidArgument(std::string(what) + ": device_index " + std::to_string(device_index) +
                          " is out of range (" + std::to_string(count) + " CUDA devices)");
  }
}

}  // namespace

std::unique_ptr<Arena> make_host_arena(int64_t bytes, bool pinned) {
  check_arena_bytes(bytes, "make_host_arena");
  return std::make_unique<HostArena>(bytes, pinned);
}

std::unique_ptr<Arena> make_cuda_arena(int64_t bytes, int device_index) {
  check_arena_bytes(bytes, "make_cuda_arena");
  check_cuda_device(device_index, "make_cuda_arena");
#ifdef MOELORA_WITH_CUDA
  return std::make_unique<CudaArena>(bytes, device_index);
#else
  throw CudaError("make_cuda_arena: libmoelora was built without CUDA");
#endif
}

int64_t cuda_arena_bytes_for_fraction(double fraction, int device_index) {
  if (!(fraction > 0.0 && fraction <= 1.0)) {
    throw InvalidArgument("cuda_arena_bytes_for_fraction: fraction must be in (0, 1], got " +
                          std::to_string(fraction));
  }
  if (cuda_device_count() == 0) return 0;
#ifdef MOELORA_WITH_CUDA
  check_cuda_device(device_index, "cuda_arena_bytes_for_fraction");
  int previous = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&previous));
  MOELORA_CUDA_CHECK(cudaSetDevice(device_index));
  size_t free_bytes = 0, total_bytes = 0;
  const cudaError_t status = cudaMemGetInfo(&free_bytes, &total_bytes);
  cudaSetDevice(previous);
  MOELORA_CUDA_CHECK(status);
  // Our share is `fraction` of the whole device, minus what others already hold, and never
  // more than is free now.
  const double budget = fraction * static_cast<double>(total_bytes);
  const double held_by_others = static_cast<double>(total_bytes - free_bytes);
  int64_t bytes = static_cast<int64_t>(budget - held_by_others);
  if (bytes > static_cast<int64_t>(free_bytes)) bytes = static_cast<int64_t>(free_bytes);
  if (bytes < 0) bytes = 0;
  return bytes / 256 * 256;
#else
  return 0;
#endif
}

std::unique_ptr<Arena> make_external_arena(void* base, int64_t bytes, DeviceKind device,
                                           int device_index) {
  if (base == nullptr) throw InvalidArgument("make_external_arena: base must not be null");
  check_arena_bytes(bytes, "make_external_arena");
  if (device != DeviceKind::kCPU && device != DeviceKind::kCUDA) {
    throw InvalidArgument("make_external_arena: unknown device kind " +
                          std::to_string(static_cast<int>(device)));
  }
  if (device_index < 0) {
    throw InvalidArgument("make_external_arena: device_index must be >= 0, got " +
                          std::to_string(device_index));
  }
  return std::make_unique<ExternalArena>(static_cast<std::byte*>(base), bytes, device,
                                         device_index);
}

}  // namespace moelora
