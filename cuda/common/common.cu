// Device properties and launch checks shared by the CUDA kernels.
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "common/common.cuh"
#include "common/kernel_modules.cuh"

namespace moelora::cuda::detail {

namespace {

// Attributes of the current device, read once per (device, attribute): launchers ask on every
// call, and some of those calls sit in the decode step.
int device_attribute(cudaDeviceAttr attribute) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> values;
  int device = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, static_cast<int>(attribute));
  auto found = values.find(key);
  if (found == values.end()) {
    int value = 0;
    MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
    found = values.emplace(key, value).first;
  }
  return found->second;
}

// Raises the release threshold of the current device's default memory pool once, so that
// scratch memory stays mapped between steps. Bounded: the pool is shared with anything else in
// the process that uses cudaMallocAsync.
constexpr uint64_t kRetainedScratchBytes = uint64_t{64} << 20;

void retain_scratch_pool() {
  static std::mutex mutex;
  static std::set<int> done;
  int device = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  if (!done.insert(device).second) return;
  cudaMemPool_t pool = nullptr;
  MOELORA_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t threshold = 0;
  MOELORA_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  if (threshold < kRetainedScratchBytes) {
    threshold = kRetainedScratchBytes;
    MOELORA_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  }
}

}  // namespace

void* scratch_alloc(size_t bytes, cudaStream_t stream) {
  retain_scratch_pool();
  void* ptr = nullptr;
  MOELORA_CUDA_CHECK(cudaMallocAsync(&ptr, bytes, stream));
  return ptr;
}

void scratch_free(void* ptr, cudaStream_t stream) {
  if (ptr != nullptr) MOELORA_CUDA_CHECK(cudaFreeAsync(ptr, stream));
}

int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

int compute_capability_major() { return device_attribute(cudaDevAttrComputeCapabilityMajor); }

bool cooperative_launch() { return device_attribute(cudaDevAttrCooperativeLaunch) != 0; }

void allow_dynamic_smem(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> allowed;
  int device = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& limit = allowed[{device, kernel}];
  if (bytes <= limit) return;
  MOELORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
  limit = bytes;
}

void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw CudaError(std::string(what) + " launch failed: " + cudaGetErrorString(status));
  }
}

}  // namespace moelora::cuda::detail

MOELORA_KERNEL_MODULE()
