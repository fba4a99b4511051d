// Element types that cross the library boundary.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace moelora {

enum class DType : uint8_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt32 = 3,
  kInt64 = 4,
  kUInt8 = 5,
  kUInt32 = 6,
  kFloat64 = 7,
};

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
// Parses "float32", "float16", "bfloat16", "int32", ... and the safetensors names
// ("F32", "F16", "BF16", "I32", ...). Throws InvalidArgument for anything else.
DType parse_dtype(const std::string& name);
inline bool is_floating(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16 ||
         d == DType::kFloat64;
}

}  // namespace moelora
