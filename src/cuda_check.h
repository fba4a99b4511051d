// Internal: turn CUDA runtime failures into typed CudaError exceptions.
#pragma once

#ifdef MOELORA_WITH_CUDA
#include <cuda_runtime.h>

#include <string>

#include "moelora/error.h"

#define MOELORA_CUDA_CHECK(call)                                                          \
  do {                                                                                   \
    cudaError_t moelora_status_ = (call);                                                \
    if (moelora_status_ != cudaSuccess) {                                                \
      throw ::moelora::CudaError(std::string(#call) + " failed: " +                      \
                                 cudaGetErrorString(moelora_status_) + " (" __FILE__ ":" + \
                                 std::to_string(__LINE__) + ")");                        \
    }                                                                                    \
  } while (0)
#endif
