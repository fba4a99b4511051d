// Device properties and launch checks shared by the CUDA kernels.
#include <mutex>
#include <vector>

#include "common.cuh"

namespace moelora::cuda::detail {

int sm_count() {
  static std::mutex mutex;
  static std::vector<int> counts;  // per device ordinal, 0 = not read yet
  int device = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(counts.size()) <= device) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    MOELORA_CUDA_CHECK(
        cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw CudaError(std::string(what) + " launch failed: " + cudaGetErrorString(status));
  }
}

}  // namespace moelora::cuda::detail
