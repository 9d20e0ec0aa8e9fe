#include "core/quant.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "core/half.h"

namespace moedist::core {

namespace {
// fp32 -> int via round-half-even (the hardware's CAST_RINT), saturated to int8.
inline int8_t rint_to_int8(float v) {
  float r = std::nearbyint(v);  // default rounding mode: to nearest even
  if (!(r == r)) return 0;  // NaN: not reached (rows with non-finite values are handled before)
  if (r > 127.f) r = 127.f;
  if (r < -128.f) r = -128.f;
  return static_cast<int8_t>(r);
}
}  // namespace

void dynamic_quant_row(DType dt, const uint16_t* x, const float* smooth, int64_t H, int8_t* q, float* scale) {
  float amax = 0.f;
  bool nan = false;
  for (int64_t h = 0; h < H; ++h) {
    float xf = half_to_float(dt, x[h]);
    if (smooth) xf = xf * smooth[h];
    float a = std::fabs(xf);
    nan |= a != a;
    if (a > amax) amax = a;
  }
  // Non-finite rows (docs/semantics.md): a NaN anywhere makes the scale NaN and every q 0, so the
  // whole row dequantizes to NaN; otherwise an infinity makes amax and the scale +inf, q is +-127 at
  // the infinities and 0 elsewhere (the limit of rint(xf * 127 / amax) as amax grows).
  if (nan) {
    std::memset(q, 0, static_cast<size_t>(H));
    *scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (amax == std::numeric_limits<float>::infinity()) {
    for (int64_t h = 0; h < H; ++h) {
      float xf = half_to_float(dt, x[h]);
      if (smooth) xf = xf * smooth[h];
      q[h] = std::isinf(xf) ? (xf > 0 ? int8_t{127} : int8_t{-127}) : int8_t{0};
    }
    *scale = amax;
    return;
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

void comm_quant_row(DType dt, const uint16_t* y, int64_t H, void* packed) { comm_quant_groups(dt, y, H, 0, H, packed); }

void comm_quant_groups(DType dt, const uint16_t* y, int64_t H, int64_t h_begin, int64_t h_end, void* packed) {
  int8_t* q = static_cast<int8_t*>(packed);
  uint16_t* scales = reinterpret_cast<uint16_t*>(q + H);  // H may be odd: written with memcpy below
  const float inv127 = 1.0f / 127.0f;
  if (h_end > H) h_end = H;
  for (int64_t g0 = h_begin; g0 < h_end; g0 += 8) {
    const int64_t g1 = g0 + 8 < H ? g0 + 8 : H;  // padding elements are zeros: they never raise the max
    float m = 0.f;
    bool nan = false;
    float f[8];
    for (int64_t h = g0; h < g1; ++h) {
      f[h - g0] = half_to_float(dt, y[h]);
      float a = std::fabs(f[h - g0]);
      nan |= a != a;
      if (a > m) m = a;
    }
    // Non-finite groups, as in dynamic_quant_row: a NaN gives the group scale NaN and q 0 (the group
    // dequantizes to NaN); an infinity gives scale +inf and q +-127 at the infinities, 0 elsewhere.
    const float s = nan ? std::numeric_limits<float>::quiet_NaN() : m * inv127;
    const uint16_t stored = float_to_half(dt, s);
    std::memcpy(scales + g0 / 8, &stored, 2);
    for (int64_t h = g0; h < g1; ++h) {
      const float v = f[h - g0];
      if (nan || s == 0.f) {
        q[h] = 0;
      } else if (std::isinf(s)) {
        q[h] = std::isinf(v) ? (v > 0 ? int8_t{127} : int8_t{-127}) : int8_t{0};
      } else {
        // fp32 divide by the unrounded scale, round to fp16, then fp16 -> int8 with round-half-even.
        q[h] = rint_to_int8(fp16_to_float(float_to_fp16(v / s)));
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
