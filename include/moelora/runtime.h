// What this build of libmoelora can do on this machine.
#pragma once

#include <cstdint>
#include <string>

namespace moelora {

// The library's version, e.g. "0.1.0".
const char* version();
// True when the library was compiled with the CUDA backend.
bool built_with_cuda();
// True when built with CUDA and at least one usable GPU and driver are present. A CUDA build on
// a machine without a GPU returns false and runs its CPU path.
bool cuda_available();
// Number of visible CUDA devices (0 without CUDA or without a GPU).
int cuda_device_count();

// What preload_cuda_kernels() found and did.
struct KernelPreload {
  int64_t modules = 0;       // the library's kernel modules (one per CUDA source file)
  int64_t kernels = 0;       // kernels they hold
  int64_t newly_loaded = 0;  // of those, loaded by this call (the rest were loaded already)
};

// Loads every kernel of the library on the current CUDA device now, rather than on each one's
// first launch (CUDA's lazy module loading): a server calls it at start so that no step pays a
// load. Throws CudaError where the driver predates CUDA 12.4 or the library has no CUDA backend.
KernelPreload preload_cuda_kernels();

}  // namespace moelora
