// What this build of libmoelora can do on this machine.
#pragma once

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

}  // namespace moelora
