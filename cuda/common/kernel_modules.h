// The kernel modules of libmoelora and loading them all at once.
//
// Each translation unit of cuda/ is one CUDA module (no separable compilation). CUDA loads a
// module's kernels lazily, on first launch (its default since 12.2): a kernel first launched in
// a serving step costs that step the load. Every .cu file names its module with
// MOELORA_KERNEL_MODULE() (kernel_modules.cuh), and preload_kernel_modules() loads every kernel
// of every such module on the current device: the engine calls it when it starts.
#pragma once

#include "moelora/runtime.h"

namespace moelora::cuda::detail {

// Adds the module that holds kernel `anchor` (a host stub address) to the list; returns true.
bool register_kernel_module(const void* anchor);

// Loads every kernel of the registered modules on the current device. Throws when the driver
// lacks the entry points it needs (CUDA 12.4's cuModuleEnumerateFunctions and cuFuncLoad).
KernelPreload preload_kernel_modules();

}  // namespace moelora::cuda::detail
