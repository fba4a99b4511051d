// Internal: the CUDA memory helpers shared by the copy engine, host buffers and the adapter
// cache's device row table. In builds without CUDA they report "no CUDA" (nullptr / CudaError).
#pragma once

#include <cstdint>

namespace moelora::detail {

// Page-locked host memory, or nullptr when CUDA or a GPU is absent or the allocation failed
// (the caller then falls back to ordinary memory).
void* try_pinned_host_alloc(int64_t bytes);
void pinned_host_free(void* ptr) noexcept;

// Device memory on GPU `device_index`; throws CudaError without CUDA.
void* device_alloc(int64_t bytes, int device_index);
void device_free(void* ptr, int device_index) noexcept;

}  // namespace moelora::detail
