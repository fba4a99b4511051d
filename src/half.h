// Internal: IEEE half (fp16) and bfloat16 <-> float conversions on the host, and load/store
// helpers that let one CPU kernel template serve float32, float16 and bfloat16 tensors.
// Conversions to 16 bits round to nearest even; NaN stays NaN (quieted), Inf stays Inf.
// The fp16 path follows the well-known branch-light scheme (magic-number subnormal rounding),
// which relies on the default round-to-nearest FP mode and no -ffast-math.
#pragma once

#include <cstdint>
#include <cstring>

namespace moelora {

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float bf16_bits_to_float(uint16_t bits) { return float_from_bits(uint32_t(bits) << 16); }

inline uint16_t float_to_bf16_bits(float value) {
  uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    // NaN: keep sign and the top payload bits, force the quiet bit so it cannot become Inf.
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7fffu + lsb;  // round to nearest, ties to even; overflow correctly reaches Inf
  return static_cast<uint16_t>(bits >> 16);
}

inline float fp16_bits_to_float(uint16_t half) {
  uint32_t sign = uint32_t(half & 0x8000u) << 16;
  uint32_t exponent = (half >> 10) & 0x1fu;
  uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in float.
    float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_fp16_bits(float value) {
  constexpr uint32_t kFloatInf = 255u << 23;
  constexpr uint32_t kHalfOverflow = (127u + 16u) << 23;  // 65536.0f: always Inf in fp16
  constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t bits = float_bits(value);
  uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t half;
  if (bits >= kHalfOverflow) {
    half = bits > kFloatInf ? 0x7e00u : 0x7c00u;  // NaN stays NaN, the rest saturates to Inf
  } else if (bits < (113u << 23)) {
    // Result is subnormal or zero: adding the magic number lets the FPU do the rounding.
    float rounded = float_from_bits(bits) + float_from_bits(kDenormMagic);
    half = float_bits(rounded) - kDenormMagic;
  } else {
    uint32_t mantissa_odd = (bits >> 13) & 1u;
    bits += (uint32_t(15 - 127) << 23) + 0xfffu;  // rebias exponent, round half up ...
    bits += mantissa_odd;                         // ... then ties to even
    half = bits >> 13;
  }
  return static_cast<uint16_t>(half | (sign >> 16));
}

// Storage types: 16-bit payloads with distinct types so templates can dispatch on them.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float to_float(float value) { return value; }
inline float to_float(Half value) { return fp16_bits_to_float(value.bits); }
inline float to_float(BFloat16 value) { return bf16_bits_to_float(value.bits); }

template <typename T>
T from_float(float value);
template <>
inline float from_float<float>(float value) {
  return value;
}
template <>
inline Half from_float<Half>(float value) {
  return Half{float_to_fp16_bits(value)};
}
template <>
inline BFloat16 from_float<BFloat16>(float value) {
  return BFloat16{float_to_bf16_bits(value)};
}

template <typename T>
inline float load_as_float(const T* ptr) {
  return to_float(*ptr);
}
template <typename T>
inline void store_from_float(T* ptr, float value) {
  *ptr = from_float<T>(value);
}

// Converts `count` elements to float, e.g. one row of activations or LoRA weights.
template <typename T>
inline void load_row_as_float(const T* src, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = to_float(src[i]);
}

}  // namespace moelora
