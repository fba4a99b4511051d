// Device properties and launch checks shared by the CUDA kernels.
#include <map>
#include <mutex>
#include <utility>

#include "common.cuh"

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

}  // namespace

int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

int compute_capability_major() { return device_attribute(cudaDevAttrComputeCapabilityMajor); }

void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw CudaError(std::string(what) + " launch failed: " + cudaGetErrorString(status));
  }
}

}  // namespace moelora::cuda::detail
