// Bit-level conversions; no dependence on compiler half types so the CPU build stays portable.
#include "half_convert.h"

#include <cstring>

#include "moelora/error.h"

namespace moelora::detail {

namespace {

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace

uint16_t float_to_half_bits(float value) {
  const uint32_t x = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // inf or NaN; keep NaN quiet and non-zero
    return static_cast<uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
  const int32_t exponent = static_cast<int32_t>(abs >> 23) - 127;
  if (exponent < -25) return sign;  // below half of the smallest subnormal: rounds to zero
  uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;  // with the implicit bit
  int shift;
  uint32_t half_exponent;
  if (exponent < -14) {  // subnormal half: value = mantissa * 2^(exponent-23), unit 2^-24
    shift = -exponent - 1;  // 23 - (exponent + 24)
    half_exponent = 0;
  } else {
    shift = 13;
    half_exponent = static_cast<uint32_t>(exponent + 15);
    mantissa &= 0x7FFFFFu;
  }
  uint32_t kept = mantissa >> shift;
  const uint32_t remainder = mantissa & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  if (remainder > halfway || (remainder == halfway && (kept & 1u))) ++kept;
  // A carry out of the mantissa bumps the exponent, which is exactly the right encoding.
  return static_cast<uint16_t>(sign | ((half_exponent << 10) + kept));
}

float half_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // Subnormal: normalise into a float.
    int e = -1;
    do {
      ++e;
      mantissa <<= 1;
    } while ((mantissa & 0x400u) == 0);
    return bits_float(sign | (static_cast<uint32_t>(127 - 15 - e) << 23) |
                      ((mantissa & 0x3FFu) << 13));
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t float_to_bfloat16_bits(float value) {
  const uint32_t x = float_bits(value);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN
  const uint32_t rounding = 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding) >> 16);
}

float bfloat16_bits_to_float(uint16_t bits) { return bits_float(static_cast<uint32_t>(bits) << 16); }

float load_as_float(const void* data, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(data)[index];
    case DType::kFloat16: return half_bits_to_float(static_cast<const uint16_t*>(data)[index]);
    case DType::kBFloat16:
      return bfloat16_bits_to_float(static_cast<const uint16_t*>(data)[index]);
    default: throw InvalidArgument(std::string("cannot read ") + dtype_name(dtype) + " as float");
  }
}

void store_from_float(void* data, DType dtype, int64_t index, float value) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(data)[index] = value; return;
    case DType::kFloat16:
      static_cast<uint16_t*>(data)[index] = float_to_half_bits(value);
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(data)[index] = float_to_bfloat16_bits(value);
      return;
    default: throw InvalidArgument(std::string("cannot store float as ") + dtype_name(dtype));
  }
}

}  // namespace moelora::detail
