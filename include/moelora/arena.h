// One block of memory reserved once at start-up, on the host or on a GPU. The page pool divides
// it into pages; nothing else in the library allocates per request or per adapter.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "moelora/tensor_ref.h"

namespace moelora {

class Arena {
 public:
  virtual ~Arena() = default;
  virtual std::byte* base() const = 0;
  virtual int64_t bytes() const = 0;
  virtual DeviceKind device() const = 0;
  virtual int device_index() const = 0;
};

// Host memory, 4 KiB aligned. `pinned` asks for page-locked memory (cudaHostAlloc) on CUDA
// builds with a GPU present; elsewhere it falls back to ordinary memory.
std::unique_ptr<Arena> make_host_arena(int64_t bytes, bool pinned = false);
// Device memory on GPU `device_index` (cudaMalloc). Throws CudaError where there is no CUDA.
std::unique_ptr<Arena> make_cuda_arena(int64_t bytes, int device_index = 0);
// Bytes that make_cuda_arena can take for a `fraction` of the device's total memory, after
// what is already in use by others (cudaMemGetInfo). 0 where there is no CUDA.
int64_t cuda_arena_bytes_for_fraction(double fraction, int device_index = 0);
// A non-owning view of memory someone else allocated (e.g. a torch tensor made by Python); the
// memory must outlive the arena. base must be non-null and bytes positive.
std::unique_ptr<Arena> make_external_arena(void* base, int64_t bytes, DeviceKind device,
                                           int device_index = 0);

}  // namespace moelora
