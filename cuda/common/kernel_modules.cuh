// MOELORA_KERNEL_MODULE(): names this translation unit's module for preload_kernel_modules()
// (kernel_modules.h). Once per .cu file, at global scope; a test checks every file has it.
#pragma once

#include "common/kernel_modules.h"

#define MOELORA_KERNEL_MODULE()                                                           \
  namespace {                                                                             \
  __global__ void moelora_kernel_module_anchor() {}                                       \
  [[maybe_unused]] const bool moelora_kernel_module_registered =                          \
      ::moelora::cuda::detail::register_kernel_module(                                    \
          reinterpret_cast<const void*>(&moelora_kernel_module_anchor));                  \
  }
