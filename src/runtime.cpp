// Version and CUDA availability. A CUDA build links the CUDA runtime statically, so on a
// machine without a driver or GPU the device query fails and cuda_available() is false.
#include "moelora/runtime.h"

#include "moelora/error.h"
#include "moelora/version.h"

#ifdef MOELORA_WITH_CUDA
#include <cuda_runtime.h>

#include "common/kernel_modules.h"
#endif

namespace moelora {

const char* version() { return MOELORA_VERSION_STRING; }

bool built_with_cuda() {
#ifdef MOELORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef MOELORA_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls start clean
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

bool cuda_available() { return cuda_device_count() > 0; }

KernelPreload preload_cuda_kernels() {
#ifdef MOELORA_WITH_CUDA
  return cuda::detail::preload_kernel_modules();
#else
  throw CudaError("preload_cuda_kernels: this build of libmoelora has no CUDA backend");
#endif
}

}  // namespace moelora
