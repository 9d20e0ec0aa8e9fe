// bfloat16 / float16 <-> float32, round to nearest even, written out bit by bit so that every
// platform (and later device code) produces the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "moedist/tensor.h"

namespace moedist::core {

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

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;
  return static_cast<uint16_t>(u >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // subnormal: man * 2^-24, exact in float
    float v = static_cast<float>(man) * bits_float(0x33800000u);  // 2^-24
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_fp16(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: subnormal half (or zero)
    // value = a_float; half subnormal unit = 2^-24. Round a_float / 2^-24 to nearest even integer.
    uint32_t exp = a >> 23;
    if (exp < 102) return sign;  // < 2^-25: rounds to zero (2^-25 exactly ties to even zero)
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exp;  // value = man * 2^(exp-150); in units of 2^-24: man >> (126-exp)
    uint32_t q = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits
  uint32_t r = a - 0x38000000u;  // exponent - 112
  uint32_t lsb = (r >> 13) & 1u;
  r += 0xfffu + lsb;
  return static_cast<uint16_t>(sign | (r >> 13));
}

inline float half_to_float(DType dt, uint16_t h) {
  return dt == DType::kBFloat16 ? bf16_to_float(h) : fp16_to_float(h);
}
inline uint16_t float_to_half(DType dt, float f) {
  return dt == DType::kBFloat16 ? float_to_bf16(f) : float_to_fp16(f);
}
// Round a float to the nearest value representable in dt (bf16/fp16), as a float.
inline float round_to(DType dt, float f) { return half_to_float(dt, float_to_half(dt, f)); }

}  // namespace moedist::core
