// bfloat16 and float16 <-> float32 conversion, for making inputs and reading outputs of the ops.
//
// moedist stores bfloat16 and float16 tensors as raw 16-bit patterns (uint16_t). These functions convert
// between those bits and float, rounding to nearest with ties to even, exactly as the ops and the
// reference model do, so a value written with them and read back by the library (or the other way round)
// holds the same bits on every platform. Header-only, no dependencies beyond the standard library.
#pragma once

#include <cstdint>
#include <cstring>

#include "moedist/tensor.h"

namespace moedist {

namespace half_detail {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace half_detail

// [in] h: a bfloat16 bit pattern. Returns its value as float (exact: every bfloat16 is a float).
inline float bf16_to_float(uint16_t h) { return half_detail::bits_float(static_cast<uint32_t>(h) << 16); }

// [in] f: any float. Returns the nearest bfloat16 (ties to even); a NaN stays a (quiet) NaN, values past
// the bfloat16 range become +-infinity.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = half_detail::float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  const uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;
  return static_cast<uint16_t>(u >> 16);
}

// [in] h: an IEEE float16 bit pattern. Returns its value as float (exact, subnormals included).
inline float fp16_to_float(uint16_t h) {
  using half_detail::bits_float;
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    const float v = static_cast<float>(man) * bits_float(0x33800000u);  // subnormal: man * 2^-24, exact
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// [in] f: any float. Returns the nearest float16 (ties to even), subnormals included; |f| >= 65520 becomes
// +-infinity, a NaN a quiet NaN.
inline uint16_t float_to_fp16(float f) {
  const uint32_t u = half_detail::float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal float16 (or zero), in units of 2^-24
    const uint32_t exp = a >> 23;
    if (exp < 102) return sign;  // below 2^-25 rounds to zero (2^-25 itself ties to the even zero)
    const uint32_t man = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // value = man * 2^(exp - 150) = (man >> shift) units of 2^-24
    uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t r = a - 0x38000000u;  // normal: rebias the exponent, then round the mantissa from 23 to 10 bits
  const uint32_t lsb = (r >> 13) & 1u;
  r += 0xfffu + lsb;
  return static_cast<uint16_t>(sign | (r >> 13));
}

// The two above chosen by dtype. [in] dt: DType::kBFloat16 or DType::kFloat16 (any other dtype is
// treated as float16).
inline float half_to_float(DType dt, uint16_t h) { return dt == DType::kBFloat16 ? bf16_to_float(h) : fp16_to_float(h); }
inline uint16_t float_to_half(DType dt, float f) { return dt == DType::kBFloat16 ? float_to_bf16(f) : float_to_fp16(f); }

// f rounded to the nearest value representable in dt (bfloat16 or float16), as a float.
inline float round_to(DType dt, float f) { return half_to_float(dt, float_to_half(dt, f)); }

}  // namespace moedist
