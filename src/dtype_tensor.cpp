// Small shared pieces: error kind names, dtypes, tensor views.
#include <array>
#include <string>

#include "moelora/dtype.h"
#include "moelora/error.h"
#include "moelora/tensor_ref.h"

namespace moelora {

const char* error_kind_name(ErrorKind kind) noexcept {
  switch (kind) {
    case ErrorKind::kInvalidArgument: return "InvalidArgument";
    case ErrorKind::kPoolExhausted: return "PoolExhausted";
    case ErrorKind::kAdapterError: return "AdapterError";
    case ErrorKind::kNotFound: return "NotFound";
    case ErrorKind::kIoError: return "IoError";
    case ErrorKind::kCudaError: return "CudaError";
    case ErrorKind::kCancelled: return "Cancelled";
    case ErrorKind::kInternal: return "InternalError";
  }
  return "Error";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
    case DType::kUInt8: return 1;
    case DType::kUInt32: return 4;
    case DType::kFloat64: return 8;
  }
  throw InvalidArgument("unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
    case DType::kUInt32: return "uint32";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

DType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "F32") return DType::kFloat32;
  if (name == "float16" || name == "F16") return DType::kFloat16;
  if (name == "bfloat16" || name == "BF16") return DType::kBFloat16;
  if (name == "int32" || name == "I32") return DType::kInt32;
  if (name == "int64" || name == "I64") return DType::kInt64;
  if (name == "uint8" || name == "U8") return DType::kUInt8;
  if (name == "uint32" || name == "U32") return DType::kUInt32;
  if (name == "float64" || name == "F64") return DType::kFloat64;
  throw InvalidArgument("unsupported dtype '" + name + "'");
}

bool TensorRef::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && stride[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

// Built with std::to_string, not a stream: the number formatting of iostreams goes through the
// locale's facets, which crash when a statically linked C++ runtime in this library meets the
// process's shared one (as on the GPU machine, whose g++ links libstdc++ statically).
std::string TensorRef::describe() const {
  const auto join = [this](const std::array<int64_t, kMaxDims>& values) {
    std::string list;
    for (int i = 0; i < ndim; ++i) list += (i ? ", " : "") + std::to_string(values[i]);
    return list;
  };
  return std::string(dtype_name(dtype)) + "[" + join(shape) + "] strides [" + join(stride) +
         "] on " + (device == DeviceKind::kCPU ? "cpu" : "cuda:" + std::to_string(device_index));
}

TensorRef make_tensor_ref(void* data, DType dtype, std::initializer_list<int64_t> shape,
                          DeviceKind device, int device_index) {
  MOELORA_CHECK_ARG(static_cast<int>(shape.size()) <= TensorRef::kMaxDims,
                    "make_tensor_ref: too many dimensions");
  TensorRef t;
  t.data = data;
  t.dtype = dtype;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.stride[d] = stride;
    stride *= t.shape[d];
  }
  t.device = device;
  t.device_index = device_index;
  return t;
}

}  // namespace moelora
