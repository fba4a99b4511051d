// Internal: float <-> float16 / bfloat16 conversions on the host, round-to-nearest-even, with
// subnormals, infinities and NaN handled as IEEE 754 specifies.
#pragma once

#include <cstdint>

#include "moelora/dtype.h"

namespace moelora::detail {

uint16_t float_to_half_bits(float value);
float half_bits_to_float(uint16_t bits);
uint16_t float_to_bfloat16_bits(float value);
float bfloat16_bits_to_float(uint16_t bits);

// Reads element `index` of a float32/float16/bfloat16 array as a float.
float load_as_float(const void* data, DType dtype, int64_t index);
// Writes `value` converted to `dtype` (float32/float16/bfloat16) at element `index`.
void store_from_float(void* data, DType dtype, int64_t index, float value);

}  // namespace moelora::detail
