#include "core/quant.h"

#include <cmath>
#include <cstring>

#include "core/half.h"

namespace moedist::core {

namespace {
// fp32 -> int via round-half-even (the hardware's CAST_RINT), saturated to int8.
inline int8_t rint_to_int8(float v) {
  float r = std::nearbyint(v);  // default rounding mode: to nearest even
  if (!(r == r)) return 0;  // NaN (only from non-finite input)
  if (r > 127.f) r = 127.f;
  if (r < -128.f) r = -128.f;
  return static_cast<int8_t>(r);
}
}  // namespace

void dynamic_quant_row(DType dt, const uint16_t* x, const float* smooth, int64_t H, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t h = 0; h < H; ++h) {
    float xf = half_to_float(dt, x[h]);
    if (smooth) xf = xf * smooth[h];
    float a = std::fabs(xf);
    if (a > amax) amax = a;
  }
  if (amax == 0.f) {
    std::memset(q, 0, static_cast<size_t>(H));
    *scale = 0.f;
    return;
  }
  const float m = 127.0f / amax;
  for (int64_t h = 0; h < H; ++h) {
    float xf = half_to_float(dt, x[h]);
    if (smooth) xf = xf * smooth[h];
    q[h] = rint_to_int8(xf * m);
  }
  *scale = 1.0f / m;
}

int64_t comm_quant_row_bytes(int64_t H) { return H + ((H + 7) / 8) * 2; }

void comm_quant_row(DType dt, const uint16_t* y, int64_t H, void* packed) {
  int8_t* q = static_cast<int8_t*>(packed);
  uint16_t* scales = reinterpret_cast<uint16_t*>(q + H);  // H may be odd: written with memcpy below
  const float inv127 = 1.0f / 127.0f;
  for (int64_t g0 = 0; g0 < H; g0 += 8) {
    const int64_t g1 = g0 + 8 < H ? g0 + 8 : H;  // padding elements are zeros: they never raise the max
    float m = 0.f;
    float f[8];
    for (int64_t h = g0; h < g1; ++h) {
      f[h - g0] = half_to_float(dt, y[h]);
      float a = std::fabs(f[h - g0]);
      if (a > m) m = a;
    }
    const float s = m * inv127;
    const uint16_t stored = float_to_half(dt, s);
    std::memcpy(scales + g0 / 8, &stored, 2);
    for (int64_t h = g0; h < g1; ++h) {
      if (s == 0.f) {
        q[h] = 0;
      } else {
        // fp32 divide by the unrounded scale, round to fp16, then fp16 -> int8 with round-half-even.
        q[h] = rint_to_int8(fp16_to_float(float_to_fp16(f[h - g0] / s)));
      }
    }
  }
}

void comm_dequant_row(DType dt, const void* packed, int64_t H, float* out) {
  const int8_t* q = static_cast<const int8_t*>(packed);
  const unsigned char* scales = reinterpret_cast<const unsigned char*>(q + H);
  for (int64_t g0 = 0; g0 < H; g0 += 8) {
    uint16_t stored;
    std::memcpy(&stored, scales + (g0 / 8) * 2, 2);
    const float sf = half_to_float(dt, stored);
    const int64_t g1 = g0 + 8 < H ? g0 + 8 : H;
    for (int64_t h = g0; h < g1; ++h) out[h] = round_to(dt, static_cast<float>(q[h]) * sf);
  }
}

}  // namespace moedist::core
