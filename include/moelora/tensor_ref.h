// A non-owning view of a strided tensor: pointer, dtype, shape and strides (in elements), and
// the device it lives on. The library never allocates a kernel's output: callers pass views.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "moelora/dtype.h"

namespace moelora {

enum class DeviceKind : uint8_t { kCPU = 0, kCUDA = 1 };

struct TensorRef {
  static constexpr int kMaxDims = 6;

  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> stride{};  // in elements
  DeviceKind device = DeviceKind::kCPU;
  int device_index = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  int64_t size(int dim) const { return shape[dim < 0 ? dim + ndim : dim]; }
  bool is_contiguous() const;
  // A human-readable "float32[7, 111] strides [111, 1] on cpu" for error messages.
  std::string describe() const;
};

// Builds a contiguous view of `data` with the given shape.
TensorRef make_tensor_ref(void* data, DType dtype, std::initializer_list<int64_t> shape,
                          DeviceKind device = DeviceKind::kCPU, int device_index = 0);

}  // namespace moelora
