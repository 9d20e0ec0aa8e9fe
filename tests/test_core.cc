// Unit tests of the core building blocks: bf16/fp16 conversions (bit exact, round to nearest even),
// the two int8 quantizations of the spec (hand-checked rows), the combine reduction kernel against
// the plain rounding sequence, and TensorView / Tensor basics.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <vector>

#include "core/config.h"
#include "core/half.h"
#include "core/kernels.h"
#include "core/quant.h"
#include "moedist/tensor.h"

namespace moedist::core {
namespace {

// ---------------------------------------------------------------------------------------------
// bfloat16

// An independent model of float -> bf16 round-to-nearest-even: pick the nearer of the two bf16
// neighbours in double arithmetic (exact for two floats of nearly the same magnitude); ties go to
// the candidate with an even last bit. The value just past the largest finite bf16 is 2^128 (inf).
uint16_t bf16_model(float f) {
  const uint32_t u = float_bits(f);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40u);
  if (std::isinf(f)) return static_cast<uint16_t>(u >> 16);
  const uint32_t lo_bits = u & 0xffff0000u;
  const uint32_t hi_bits = lo_bits + 0x10000u;  // one bf16 ulp further from zero
  const double sign = (u >> 31) ? -1.0 : 1.0;
  const double lo = static_cast<double>(bits_float(lo_bits));
  const double hi = (hi_bits & 0x7fffffffu) == 0x7f800000u ? sign * std::ldexp(1.0, 128) : static_cast<double>(bits_float(hi_bits));
  const double v = static_cast<double>(f);
  const double dlo = std::fabs(v - lo), dhi = std::fabs(hi - v);
  if (dlo < dhi) return static_cast<uint16_t>(lo_bits >> 16);
  if (dhi < dlo) return static_cast<uint16_t>(hi_bits >> 16);
  return ((lo_bits >> 16) & 1u) ? static_cast<uint16_t>(hi_bits >> 16) : static_cast<uint16_t>(lo_bits >> 16);
}

bool bf16_is_nan(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0; }

TEST(Bf16, CraftedRoundToNearestEven) {
  struct C {
    uint32_t in;
    uint16_t want;
    const char* what;
  };
  const C cases[] = {
      {0x3f800000u, 0x3f80, "1.0 exact"},
      {0x3f808000u, 0x3f80, "tie, lower neighbour even: stays (ties to even, down)"},
      {0x3f818000u, 0x3f82, "tie, lower neighbour odd: rounds up (ties to even, up)"},
      {0x3f807fffu, 0x3f80, "just below the tie"},
      {0x3f808001u, 0x3f81, "just above the tie"},
      {0xbf818000u, 0xbf82, "negative tie, odd: away from zero to even"},
      {0xbf808000u, 0xbf80, "negative tie, even: towards zero"},
      {0x3fffffffu, 0x4000, "carry into the exponent"},
      {0x7f800000u, 0x7f80, "+inf"},
      {0xff800000u, 0xff80, "-inf"},
      {0x7f7fffffu, 0x7f80, "FLT_MAX overflows to +inf"},
      {0xff7fffffu, 0xff80, "-FLT_MAX overflows to -inf"},
      {0x7f7f7fffu, 0x7f7f, "below the overflow tie: largest finite bf16"},
      {0x7f7f8000u, 0x7f80, "overflow tie: the even neighbour is inf"},
      {0x00000000u, 0x0000, "+0"},
      {0x80000000u, 0x8000, "-0 keeps its sign"},
      {0x00008000u, 0x0000, "subnormal tie to even zero"},
      {0x00018000u, 0x0002, "subnormal tie, odd: up"},
      {0x007fffffu, 0x0080, "largest subnormal rounds up to the smallest normal"},
      {0x807fffffu, 0x8080, "negative largest subnormal"},
  };
  for (const C& c : cases) {
    EXPECT_EQ(float_to_bf16(bits_float(c.in)), c.want) << c.what << " (input 0x" << std::hex << c.in << ")";
    EXPECT_EQ(bf16_model(bits_float(c.in)), c.want) << "model: " << c.what;
  }
}

TEST(Bf16, NaNStaysNaN) {
  // Signalling NaNs whose payload sits only in the low 16 bits: plain truncation/rounding would turn
  // them into inf (0x7f80) or carry into the sign.
  for (uint32_t in : {0x7fc00000u, 0x7f800001u, 0x7f80ffffu, 0x7fffffffu, 0xff800001u, 0xffc00000u, 0xffffffffu, 0x7f808000u}) {
    const uint16_t h = float_to_bf16(bits_float(in));
    EXPECT_TRUE(bf16_is_nan(h)) << std::hex << "input 0x" << in << " gave 0x" << h;
    EXPECT_EQ(h >> 15, in >> 31) << std::hex << "sign of NaN 0x" << in;
    EXPECT_TRUE(std::isnan(bf16_to_float(h)));
  }
}

TEST(Bf16, ExhaustiveRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_float(static_cast<uint16_t>(h));
    EXPECT_EQ(float_bits(f), h << 16);  // bf16 -> float is a shift
    const uint16_t back = float_to_bf16(f);
    if (bf16_is_nan(static_cast<uint16_t>(h))) {
      ASSERT_TRUE(bf16_is_nan(back)) << std::hex << "0x" << h;
      ASSERT_EQ(back >> 15, h >> 15);
    } else {
      ASSERT_EQ(back, h) << std::hex << "0x" << h;
    }
  }
}

TEST(Bf16, MatchesModelOnStridedSweep) {
  // Every 1021st float bit pattern (about 4.2 million), plus every pattern of the low 16 bits of
  // one mantissa (all rounding offsets of one bf16 interval) in several binades.
  uint64_t n = 0;
  for (uint64_t u = 0; u < (1ull << 32); u += 1021, ++n) {
    const float f = bits_float(static_cast<uint32_t>(u));
    const uint16_t got = float_to_bf16(f);
    if (std::isnan(f)) {
      ASSERT_TRUE(bf16_is_nan(got));
      continue;
    }
    ASSERT_EQ(got, bf16_model(f)) << std::hex << "input 0x" << u;
  }
  EXPECT_GT(n, 4000000u);
  for (uint32_t hi : {0x3f81u, 0x3f80u, 0x0001u, 0x7f7fu, 0xc2abu, 0x8000u}) {
    for (uint32_t lo = 0; lo < 65536; ++lo) {
      const float f = bits_float((hi << 16) | lo);
      ASSERT_EQ(float_to_bf16(f), bf16_model(f)) << std::hex << "input 0x" << ((hi << 16) | lo);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// float16, against the compiler's _Float16 (GCC 12 on x86-64: software conversions in libgcc,
// correctly rounded). Without _Float16 these tests are skipped.

#if defined(__FLT16_MAX__)
#define MOEDIST_HAVE_FLOAT16 1
uint16_t f16_bits(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
_Float16 f16_of_bits(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return h;
}
// (_Float16)f through a volatile, so the conversion happens at run time.
uint16_t f16_compiler(float f) {
  volatile float vf = f;
  const _Float16 h = static_cast<_Float16>(vf);
  return f16_bits(h);
}
bool f16_is_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

// Compares float_to_fp16(f) with (_Float16)f; NaN must give NaN with the same sign.
::testing::AssertionResult fp16_matches(float f) {
  const uint16_t got = float_to_fp16(f);
  const uint16_t want = f16_compiler(f);
  if (std::isnan(f)) {
    if (f16_is_nan(got) && (got >> 15) == (want >> 15)) return ::testing::AssertionSuccess();
  } else if (got == want) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << std::hex << "float 0x" << float_bits(f) << " (" << f << "): got 0x" << got
                                       << ", _Float16 gives 0x" << want;
}
#endif

TEST(Fp16, ExhaustiveToFloatMatchesCompiler) {
#ifndef MOEDIST_HAVE_FLOAT16
  GTEST_SKIP() << "_Float16 not available (no __FLT16_MAX__)";
#else
  for (uint32_t h = 0; h < 65536; ++h) {
    const float got = fp16_to_float(static_cast<uint16_t>(h));
    volatile uint16_t vb = static_cast<uint16_t>(h);
    const float want = static_cast<float>(f16_of_bits(vb));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << "0x" << h;
      ASSERT_EQ(std::signbit(got), std::signbit(want)) << std::hex << "0x" << h;
    } else {
      ASSERT_EQ(float_bits(got), float_bits(want)) << std::hex << "0x" << h << ": got " << got << ", want " << want;
    }
  }
#endif
}

TEST(Fp16, ExhaustiveRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t back = float_to_fp16(fp16_to_float(static_cast<uint16_t>(h)));
    const bool nan = (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
    if (nan) {
      ASSERT_TRUE((back & 0x7c00u) == 0x7c00u && (back & 0x3ffu) != 0) << std::hex << "0x" << h;
      ASSERT_EQ(back >> 15, h >> 15);
    } else {
      ASSERT_EQ(back, h) << std::hex << "0x" << h;
    }
  }
}

TEST(Fp16, CraftedValues) {
  struct C {
    float in;
    uint16_t want;
  };
  const C cases[] = {
      {1.0f, 0x3c00},          {-2.0f, 0xc000},
      {65504.0f, 0x7bff},      {65519.99609375f, 0x7bff},  // just below the overflow tie
      {65520.0f, 0x7c00},      {65536.0f, 0x7c00},         // overflow tie rounds to inf
      {-65520.0f, 0xfc00},     {std::numeric_limits<float>::infinity(), 0x7c00},
      {0.0f, 0x0000},          {-0.0f, 0x8000},
      {0x1p-24f, 0x0001},      {0x1p-25f, 0x0000},         // smallest subnormal; its half ties to even 0
      {0x1.8p-24f, 0x0002},    {0x1.4p-24f, 0x0001},       // 1.5 units: tie to even 2; 1.25: down
      {0x1.000002p-25f, 0x0001},                           // just above half a unit
      {0x1p-14f, 0x0400},      {0x1.ff8p-15f, 0x03ff},     // smallest normal; largest subnormal (1023 units)
      {0x1.ffcp-15f, 0x0400},                              // 1023.5 units: tie, odd, rounds up to the smallest normal
      {0x1.ff0p-15f, 0x03fe},  {-0x1p-14f, 0x8400},
      {1.0f + 0x1p-11f, 0x3c00}, {1.0f + 0x3p-11f, 0x3c02},  // ties to even down / up
  };
  for (const C& c : cases) EXPECT_EQ(float_to_fp16(c.in), c.want) << std::hexfloat << c.in;
#ifdef MOEDIST_HAVE_FLOAT16
  for (const C& c : cases) EXPECT_TRUE(fp16_matches(c.in));
#endif
  for (uint32_t in : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu}) {
    const uint16_t h = float_to_fp16(bits_float(in));
    EXPECT_TRUE((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0) << std::hex << in;
    EXPECT_EQ(h >> 15, in >> 31);
  }
}

TEST(Fp16, FromFloatMatchesCompiler) {
#ifndef MOEDIST_HAVE_FLOAT16
  GTEST_SKIP() << "_Float16 not available (no __FLT16_MAX__)";
#else
  uint64_t n = 0;
  // 1. Every 1021st float bit pattern over the whole 32-bit space (about 4.2 million).
  for (uint64_t u = 0; u < (1ull << 32); u += 1021, ++n) ASSERT_TRUE(fp16_matches(bits_float(static_cast<uint32_t>(u))));
  // 2. Contiguous bit patterns around the subnormal/normal boundary (2^-14), the smallest
  //    subnormal (2^-24) and half of it (2^-25), both signs.
  for (uint32_t centre : {0x38800000u, 0x33800000u, 0x33000000u, 0x38000000u}) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      for (uint32_t u = centre - (1u << 19); u < centre + (1u << 19); ++u, ++n) ASSERT_TRUE(fp16_matches(bits_float(sign | u)));
    }
  }
  // 3. The overflow boundary: every float in [65504, 65536] and a little beyond, both signs.
  for (uint32_t sign : {0u, 0x80000000u})
    for (uint32_t u = 0x477fe000u - 4096; u <= 0x47800000u + 4096; ++u, ++n) ASSERT_TRUE(fp16_matches(bits_float(sign | u)));
  // 4. Every halfway point between two adjacent fp16 values (finite, both signs), and its float
  //    neighbours: the ties and the values a float ulp either side of them.
  for (uint32_t h = 0; h < 0x7bffu; ++h) {
    for (uint32_t sign : {0u, 0x8000u}) {
      const float a = fp16_to_float(static_cast<uint16_t>(sign | h));
      const float b = fp16_to_float(static_cast<uint16_t>(sign | (h + 1)));
      const float mid = (a + b) * 0.5f;  // exact: 11-bit values, one bit more fits in a float
      ASSERT_EQ(static_cast<double>(mid), (static_cast<double>(a) + static_cast<double>(b)) / 2);
      const float inf = std::numeric_limits<float>::infinity();
      for (float f : {a, mid, std::nextafter(mid, inf), std::nextafter(mid, -inf), std::nextafter(std::nextafter(mid, inf), inf),
                      std::nextafter(std::nextafter(mid, -inf), -inf), std::nextafter(a, inf), std::nextafter(a, -inf)}) {
        ASSERT_TRUE(fp16_matches(f));
        ++n;
      }
      // The tie itself: even wins.
      const uint16_t even = (h & 1u) ? static_cast<uint16_t>(sign | (h + 1)) : static_cast<uint16_t>(sign | h);
      ASSERT_EQ(float_to_fp16(mid), even) << std::hex << "tie between 0x" << (sign | h) << " and 0x" << (sign | (h + 1));
    }
  }
  EXPECT_GT(n, 9000000u);
#endif
}

// ---------------------------------------------------------------------------------------------
// dispatch quant_mode 2: dynamic per-token int8 (docs/semantics.md §5)

std::vector<uint16_t> halves(DType dt, std::initializer_list<float> v) {
  std::vector<uint16_t> out;
  for (float f : v) {
    const uint16_t h = float_to_half(dt, f);
    EXPECT_EQ(half_to_float(dt, h), f) << "test value not exact in " << dtype_name(dt);
    out.push_back(h);
  }
  return out;
}

TEST(DynamicQuant, HandWrittenRowBf16) {
  // amax = 4, m = 127/4 = 31.75 (exact), scale = 1/m = 1/31.75.
  // x*m:   31.75  -63.5  15.875  127  -127  7.9375  95.25  0
  // q:     32     -64    16      127  -127  8       95     0     (-63.5 is a tie: even -64)
  const auto x = halves(DType::kBFloat16, {1, -2, 0.5f, 4, -4, 0.25f, 3, 0});
  int8_t q[8];
  float scale = -1;
  dynamic_quant_row(DType::kBFloat16, x.data(), nullptr, 8, q, &scale);
  const int8_t want[8] = {32, -64, 16, 127, -127, 8, 95, 0};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(q[i], want[i]) << "h=" << i;
  EXPECT_EQ(scale, 1.0f / 31.75f);
  EXPECT_EQ(float_bits(scale), 0x3d010204u);  // 0.031496062874794006
  EXPECT_NEAR(scale, 4.0 / 127.0, 1e-9);
}

TEST(DynamicQuant, TiesGoToEven) {
  // amax = 127: m = 1 exactly, so q = rint_even(x): 2.5 -> 2, -3.5 -> -4, 0.5 -> 0, 1.5 -> 2, -0.5 -> 0.
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    const auto x = halves(dt, {127, 2.5f, -3.5f, 0.5f, 1.5f, -0.5f, 100, -127});
    int8_t q[8];
    float scale = -1;
    dynamic_quant_row(dt, x.data(), nullptr, 8, q, &scale);
    const int8_t want[8] = {127, 2, -4, 0, 2, 0, 100, -127};
    for (int i = 0; i < 8; ++i) EXPECT_EQ(q[i], want[i]) << dtype_name(dt) << " h=" << i;
    EXPECT_EQ(scale, 1.0f);
  }
}

TEST(DynamicQuant, ZeroRowGivesZeroScale) {
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    std::vector<uint16_t> x = halves(dt, {0, -0.0f, 0, 0, 0});
    int8_t q[5] = {1, 1, 1, 1, 1};
    float scale = -1;
    dynamic_quant_row(dt, x.data(), nullptr, 5, q, &scale);
    for (int i = 0; i < 5; ++i) EXPECT_EQ(q[i], 0);
    EXPECT_EQ(float_bits(scale), 0u) << "scale must be +0, not NaN/inf";
    // A smooth row of zeros also zeroes a non-zero x.
    const auto y = halves(dt, {1, 2, 3});
    const float smooth[3] = {0, 0, 0};
    dynamic_quant_row(dt, y.data(), smooth, 3, q, &scale);
    EXPECT_EQ(q[0], 0);
    EXPECT_EQ(q[2], 0);
    EXPECT_EQ(scale, 0.0f);
  }
}

TEST(DynamicQuant, SmoothScales) {
  // xf = x * smooth = [2, 1, 3, -4]; amax 4, m = 31.75; xf*m = [63.5, 31.75, 95.25, -127]
  // q = [64 (tie: even), 32, 95, -127]
  const auto x = halves(DType::kFloat16, {1, 2, 3, 4});
  const float smooth[4] = {2, 0.5f, 1, -1};
  int8_t q[4];
  float scale = 0;
  dynamic_quant_row(DType::kFloat16, x.data(), smooth, 4, q, &scale);
  const int8_t want[4] = {64, 32, 95, -127};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(q[i], want[i]) << "h=" << i;
  EXPECT_EQ(scale, 1.0f / 31.75f);
}

TEST(DynamicQuant, RoundTripBound) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1, 1);
  std::uniform_int_distribution<int> ex(-6, 8);
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    for (int row = 0; row < 200; ++row) {
      const int H = 1 + static_cast<int>(rng() % 40);
      const float mag = std::ldexp(1.0f, ex(rng));
      std::vector<uint16_t> x(static_cast<size_t>(H));
      for (auto& h : x) h = float_to_half(dt, u(rng) * mag);
      std::vector<int8_t> q(static_cast<size_t>(H));
      float scale = 0;
      dynamic_quant_row(dt, x.data(), nullptr, H, q.data(), &scale);
      float amax = 0;
      for (auto h : x) amax = std::max(amax, std::fabs(half_to_float(dt, h)));
      if (amax == 0) continue;
      EXPECT_NEAR(scale, amax / 127.0, amax / 127.0 * 1e-6);
      bool hit_max = false;
      for (int i = 0; i < H; ++i) {
        const double xf = half_to_float(dt, x[static_cast<size_t>(i)]);
        EXPECT_LE(std::fabs(q[static_cast<size_t>(i)] * static_cast<double>(scale) - xf), scale * (0.5 + 1e-4)) << "row " << row << " h " << i;
        hit_max |= std::abs(q[static_cast<size_t>(i)]) == 127;
      }
      EXPECT_TRUE(hit_max) << "the largest element must map to +-127";
    }
  }
}

// ---------------------------------------------------------------------------------------------
// combine comm_quant_mode 2: groups of 8, scale = max|f| * (1/127) stored in the token dtype
// (docs/semantics.md §13). Packed row: H int8 values, then ceil(H/8) scales, 2 bytes each.

uint16_t stored_scale(const std::vector<unsigned char>& packed, int64_t H, int64_t g) {
  uint16_t s;
  std::memcpy(&s, packed.data() + H + 2 * g, 2);
  return s;
}

TEST(CommQuant, RowBytes) {
  EXPECT_EQ(comm_quant_row_bytes(8), 8 + 2);
  EXPECT_EQ(comm_quant_row_bytes(11), 11 + 4);
  EXPECT_EQ(comm_quant_row_bytes(16), 16 + 4);
  EXPECT_EQ(comm_quant_row_bytes(1), 1 + 2);
  EXPECT_EQ(comm_quant_row_bytes(7168), 7168 + 1792);
}

TEST(CommQuant, HandCheckedEightBf16) {
  // m = 4; s = 4 * fl(1/127) = 0.031496062874794006 (0x3d010204, unrounded).
  // stored = bf16(s) = 0x3d01 = 2^-5 * 129/128 = 0.031494140625.
  // f/s = [31.75, -63.5, 15.875, 127, -127, 7.9375, 95.25, 0] (all exact in fp16)
  // q   = [32, -64 (tie: even), 16, 127, -127, 8, 95, 0]
  // deq = bf16(q * 129/4096): 32 -> 1.0078125, -64 -> -2.015625, 16 -> 0.50390625,
  //       127 -> 3.99975586 -> 4.0, -127 -> -4.0, 8 -> 0.251953125, 95 -> 2.99194336 -> 2.984375, 0.
  const DType dt = DType::kBFloat16;
  const auto y = halves(dt, {1, -2, 0.5f, 4, -4, 0.25f, 3, 0});
  std::vector<unsigned char> packed(static_cast<size_t>(comm_quant_row_bytes(8)), 0xAB);
  comm_quant_row(dt, y.data(), 8, packed.data());
  const int8_t want_q[8] = {32, -64, 16, 127, -127, 8, 95, 0};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(static_cast<int8_t>(packed[static_cast<size_t>(i)]), want_q[i]) << "h=" << i;
  EXPECT_EQ(stored_scale(packed, 8, 0), 0x3d01);
  EXPECT_EQ(bf16_to_float(stored_scale(packed, 8, 0)), 0.031494140625f);
  float out[8];
  comm_dequant_row(dt, packed.data(), 8, out);
  const float want[8] = {1.0078125f, -2.015625f, 0.50390625f, 4.0f, -4.0f, 0.251953125f, 2.984375f, 0.0f};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(out[i], want[i]) << "h=" << i;
}

TEST(CommQuant, HandCheckedElevenFp16PartialGroup) {
  // Group 0 (8 elements): m = 127, s = fl(127 * fl(1/127)) = 1.0 exactly, stored fp16 0x3c00.
  //   q = rint_even(f) = [127, 2, -4, 0, 2, 0, 100, -127]; deq = q.
  // Group 1 (3 elements, partial): [8, -3, 0.75]; m = 8, s = 0.06299212574958801 (0x3d810204),
  //   stored = fp16(s) = 2^-4 * 1.0078125 = 0.06298828125 (0x2c08).
  //   f/s = [127, -47.625, 11.90625] (exact in fp16), q = [127, -48, 12],
  //   deq = fp16(q * 0.06298828125) = [7.99951171875 -> 8.0, -3.0234375, 0.755859375].
  const DType dt = DType::kFloat16;
  const auto y = halves(dt, {127, 2.5f, -3.5f, 0.5f, 1.5f, -0.5f, 100, -127, 8, -3, 0.75f});
  std::vector<unsigned char> packed(static_cast<size_t>(comm_quant_row_bytes(11)), 0xAB);
  ASSERT_EQ(packed.size(), 15u);
  comm_quant_row(dt, y.data(), 11, packed.data());
  const int8_t want_q[11] = {127, 2, -4, 0, 2, 0, 100, -127, 127, -48, 12};
  for (int i = 0; i < 11; ++i) EXPECT_EQ(static_cast<int8_t>(packed[static_cast<size_t>(i)]), want_q[i]) << "h=" << i;
  EXPECT_EQ(stored_scale(packed, 11, 0), 0x3c00);
  EXPECT_EQ(stored_scale(packed, 11, 1), 0x2c08);
  EXPECT_EQ(fp16_to_float(0x2c08), 0.06298828125f);
  float out[11];
  comm_dequant_row(dt, packed.data(), 11, out);
  const float want[11] = {127, 2, -4, 0, 2, 0, 100, -127, 8.0f, -3.0234375f, 0.755859375f};
  for (int i = 0; i < 11; ++i) EXPECT_EQ(out[i], want[i]) << "h=" << i;
}

TEST(CommQuant, AllZeroGroup) {
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    // Group 0 non-zero, group 1 all zeros (with a -0), group 2 partial and zero.
    std::vector<float> v = {1, 2, 3, 4, 5, 6, 7, 8, 0, 0, -0.0f, 0, 0, 0, 0, 0, 0, 0};
    std::vector<uint16_t> y;
    for (float f : v) y.push_back(float_to_half(dt, f));
    const int64_t H = static_cast<int64_t>(v.size());
    std::vector<unsigned char> packed(static_cast<size_t>(comm_quant_row_bytes(H)), 0xAB);
    comm_quant_row(dt, y.data(), H, packed.data());
    for (int64_t i = 8; i < H; ++i) EXPECT_EQ(static_cast<int8_t>(packed[static_cast<size_t>(i)]), 0) << dtype_name(dt) << " h=" << i;
    EXPECT_EQ(stored_scale(packed, H, 1), 0);
    EXPECT_EQ(stored_scale(packed, H, 2), 0);
    std::vector<float> out(static_cast<size_t>(H), 99.f);
    comm_dequant_row(dt, packed.data(), H, out.data());
    for (int64_t i = 8; i < H; ++i) EXPECT_EQ(out[static_cast<size_t>(i)], 0.0f) << "h=" << i;
    EXPECT_EQ(static_cast<int8_t>(packed[7]), 127);
  }
}

TEST(CommQuant, RoundTripErrorBound) {
  // |deq - y| <= s/2 (int8 rounding) + s/32 (fp16 rounding of f/s, |f/s| <= 127)
  //            + m*u (rounding of the stored scale, |q| <= 127) + |deq|*u (final rounding),
  // with s = m/127 the unrounded group scale and u the unit roundoff of the dtype.
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1, 1);
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    const double unit = dt == DType::kBFloat16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
    std::uniform_int_distribution<int> ex(dt == DType::kBFloat16 ? -20 : -4, dt == DType::kBFloat16 ? 20 : 12);
    for (int row = 0; row < 300; ++row) {
      const int64_t H = 1 + static_cast<int64_t>(rng() % 50);
      std::vector<uint16_t> y(static_cast<size_t>(H));
      // Magnitudes in [0.5, 1) * 2^ex (fp16: ex >= -4 keeps every group scale a normal fp16), one in
      // eight exactly zero, random signs.
      for (auto& h : y) {
        const float mag = (0.5f + 0.5f * std::fabs(u(rng))) * std::ldexp(1.0f, ex(rng));
        h = float_to_half(dt, rng() % 8 == 0 ? 0.0f : (rng() % 2 ? mag : -mag));
      }
      std::vector<unsigned char> packed(static_cast<size_t>(comm_quant_row_bytes(H)));
      comm_quant_row(dt, y.data(), H, packed.data());
      std::vector<float> out(static_cast<size_t>(H));
      comm_dequant_row(dt, packed.data(), H, out.data());
      for (int64_t g0 = 0; g0 < H; g0 += 8) {
        const int64_t g1 = std::min(H, g0 + 8);
        double m = 0;
        for (int64_t h = g0; h < g1; ++h) m = std::max(m, std::fabs(static_cast<double>(half_to_float(dt, y[static_cast<size_t>(h)]))));
        const double s = m / 127.0;
        for (int64_t h = g0; h < g1; ++h) {
          const double f = half_to_float(dt, y[static_cast<size_t>(h)]);
          const double d = out[static_cast<size_t>(h)];
          const double bound = s * (0.5 + 1.0 / 32) + m * unit * 1.001 + std::fabs(d) * unit * 1.01;
          EXPECT_LE(std::fabs(d - f), bound) << dtype_name(dt) << " row " << row << " h " << h << " f " << f << " deq " << d;
          EXPECT_LE(std::abs(static_cast<int>(static_cast<int8_t>(packed[static_cast<size_t>(h)]))), 127);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// TensorView / Tensor

// ---------------------------------------------------------------------------------------------
// The combine reduction kernel (vectorized, with explicit AVX-512 where the CPU has it) against the
// spec's sequence written plainly: acc = 0; per term acc = acc + float(y) * w (weighted) or
// acc = acc + float(y); out = round(acc). Lengths around the vector widths, 0 to 11 terms, values
// from normal rows and from raw bit patterns (subnormals, infinities, NaNs).

uint16_t reduce_model(DType dt, const std::vector<RowTerm>& terms, int64_t h) {
  float acc = 0.f;
  for (const RowTerm& t : terms) {
    const float y = half_to_float(dt, t.row[h]);
    if (t.weighted) {
      const volatile float prod = y * t.w;  // rounded to fp32 on its own, never fused
      acc = acc + prod;
    } else {
      acc = acc + y;
    }
  }
  return float_to_half(dt, acc);
}

bool half_is_nan(DType dt, uint16_t h) { return std::isnan(half_to_float(dt, h)); }

TEST(ReduceTerms, MatchesPlainRoundingSequence) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    for (int64_t H : {1, 15, 16, 31, 32, 33, 63, 100, 129, 1024, 7168}) {
      for (int n : {0, 1, 2, 5, 8, 11}) {
        for (bool raw_bits : {false, true}) {
          std::vector<std::vector<uint16_t>> rows(static_cast<size_t>(n), std::vector<uint16_t>(static_cast<size_t>(H)));
          std::vector<RowTerm> terms;
          for (int i = 0; i < n; ++i) {
            for (auto& v : rows[static_cast<size_t>(i)]) v = raw_bits ? static_cast<uint16_t>(rng()) : float_to_half(dt, nd(rng) * 4.f);
            terms.push_back({rows[static_cast<size_t>(i)].data(), nd(rng), i % 3 != 2});
          }
          std::vector<uint16_t> out(static_cast<size_t>(H), 0xdead);
          if (dt == DType::kBFloat16)
            reduce_terms_bf16(out.data(), terms.data(), n, H);
          else
            reduce_terms_fp16(out.data(), terms.data(), n, H);
          int bad = 0;
          for (int64_t h = 0; h < H && bad < 3; ++h) {
            const uint16_t want = reduce_model(dt, terms, h), got = out[static_cast<size_t>(h)];
            // A NaN's payload depends on operand order; only NaN-ness is specified.
            const bool same = half_is_nan(dt, want) ? half_is_nan(dt, got) : got == want;
            if (!same) {
              ++bad;
              ADD_FAILURE() << dtype_name(dt) << " H=" << H << " terms=" << n << (raw_bits ? " raw bits" : "") << " element " << h
                            << ": got 0x" << std::hex << got << ", want 0x" << want;
            }
          }
        }
      }
    }
  }
}

// The ops' quantization (vectorized) against the plain formula the reference uses: every byte and
// the scale, for rows of normal values, raw bit patterns (NaN, inf, subnormals), all-zero rows, with
// and without smooth scales, lengths on and off the vector width.
TEST(DynamicQuantFast, MatchesPlainFormula) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    for (int64_t H : {1, 15, 16, 17, 32, 48, 100, 1024, 7168}) {
      for (int kind = 0; kind < 4; ++kind) {  // 0 normal, 1 raw bits, 2 zeros, 3 normal with one huge value
        for (bool with_smooth : {false, true}) {
          std::vector<uint16_t> x(static_cast<size_t>(H));
          for (auto& v : x)
            v = kind == 1 ? static_cast<uint16_t>(rng()) : kind == 2 ? uint16_t{0} : float_to_half(dt, nd(rng) * 3.f);
          if (kind == 3) x[static_cast<size_t>(H / 2)] = float_to_half(dt, 60000.f);
          std::vector<float> smooth(static_cast<size_t>(H));
          for (auto& v : smooth) v = with_smooth && kind == 1 ? bits_float(static_cast<uint32_t>(rng())) : nd(rng);
          const float* sm = with_smooth ? smooth.data() : nullptr;
          std::vector<int8_t> want(static_cast<size_t>(H)), got(static_cast<size_t>(H), 99);
          float want_scale = -1.f, got_scale = -2.f;
          dynamic_quant_row(dt, x.data(), sm, H, want.data(), &want_scale);
          dynamic_quant_row_fast(dt, x.data(), sm, H, got.data(), &got_scale);
          const std::string what = std::string(dtype_name(dt)) + " H=" + std::to_string(H) + " kind=" + std::to_string(kind) +
                                   (with_smooth ? " smooth" : "");
          EXPECT_EQ(float_bits(got_scale), float_bits(want_scale)) << what;
          EXPECT_EQ(got, want) << what;
        }
      }
    }
  }
}

// Non-finite values in quant_mode 2 (docs/semantics.md): a NaN anywhere in xf (= x, or x * smooth)
// makes the dynamic scale NaN and every q 0, so the whole row dequantizes to NaN; otherwise an
// infinity makes the scale +inf and q +-127 at the infinities, 0 elsewhere. Checked on the plain
// formula (hand-written expectations), then the vectorized kernel against it at many positions and H.
constexpr uint32_t kQuietNan = 0x7fc00000u;

uint16_t half_nan(DType dt) { return dt == DType::kBFloat16 ? uint16_t{0x7fc0} : uint16_t{0x7e00}; }
uint16_t half_inf(DType dt, bool neg) {
  return static_cast<uint16_t>((dt == DType::kBFloat16 ? 0x7f80 : 0x7c00) | (neg ? 0x8000 : 0));
}

TEST(DynamicQuant, NanRowGivesNanScaleAndZeros) {
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    for (int pos : {0, 3, 7}) {  // NaN first, in the middle, last (after the largest value)
      auto x = halves(dt, {1, -2, 0.5f, 4, -4, 0.25f, 3, 0});
      x[static_cast<size_t>(pos)] = half_nan(dt);
      int8_t q[8];
      std::memset(q, 99, sizeof(q));
      float scale = 0;
      dynamic_quant_row(dt, x.data(), nullptr, 8, q, &scale);
      EXPECT_EQ(float_bits(scale), kQuietNan) << dtype_name(dt) << " NaN at " << pos;
      for (int i = 0; i < 8; ++i) EXPECT_EQ(q[i], 0) << dtype_name(dt) << " NaN at " << pos << " h=" << i;
    }
    // A NaN made by the smooth scale (inf * 0) counts as well.
    auto y = halves(dt, {1, 2, 3});
    y[1] = half_inf(dt, false);
    const float smooth[3] = {1, 0, 1};
    int8_t q[3] = {9, 9, 9};
    float scale = 0;
    dynamic_quant_row(dt, y.data(), smooth, 3, q, &scale);
    EXPECT_EQ(float_bits(scale), kQuietNan) << dtype_name(dt) << " inf * smooth 0";
    for (int i = 0; i < 3; ++i) EXPECT_EQ(q[i], 0);
  }
}

TEST(DynamicQuant, InfRowGivesInfScaleAndSaturatedInfinities) {
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    auto x = halves(dt, {1, -2, 0.5f, 4, -4, 0.25f, 3, 0});
    x[2] = half_inf(dt, false);
    x[5] = half_inf(dt, true);
    int8_t q[8];
    float scale = 0;
    dynamic_quant_row(dt, x.data(), nullptr, 8, q, &scale);
    EXPECT_EQ(float_bits(scale), 0x7f800000u) << dtype_name(dt);
    const int8_t want[8] = {0, 0, 127, 0, 0, -127, 0, 0};
    for (int i = 0; i < 8; ++i) EXPECT_EQ(q[i], want[i]) << dtype_name(dt) << " h=" << i;
    // NaN and inf in one row: the NaN rule.
    x[7] = half_nan(dt);
    dynamic_quant_row(dt, x.data(), nullptr, 8, q, &scale);
    EXPECT_EQ(float_bits(scale), kQuietNan) << dtype_name(dt);
    for (int i = 0; i < 8; ++i) EXPECT_EQ(q[i], 0) << dtype_name(dt) << " h=" << i;
    // A finite x times a finite smooth scale that overflows to inf follows the inf rule.
    const auto y = halves(dt, {2, 1, -2});
    const float smooth[3] = {3e38f, 1, 3e38f};
    dynamic_quant_row(dt, y.data(), smooth, 3, q, &scale);
    EXPECT_EQ(float_bits(scale), 0x7f800000u) << dtype_name(dt);
    EXPECT_EQ(q[0], 127);
    EXPECT_EQ(q[1], 0);
    EXPECT_EQ(q[2], -127);
  }
}

TEST(DynamicQuantFast, NonFiniteRowsMatchThePlainRule) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    for (int64_t H : {1, 8, 15, 16, 17, 32, 48, 64, 100, 1024, 7168}) {
      // Positions: first, last, inside the first / last vector, and random ones.
      std::vector<int64_t> where = {0, H - 1, std::min<int64_t>(H - 1, 15), std::max<int64_t>(0, H - 16), H / 2};
      for (int i = 0; i < 3; ++i) where.push_back(static_cast<int64_t>(rng() % static_cast<uint32_t>(H)));
      for (int64_t pos : where) {
        for (int kind = 0; kind < 4; ++kind) {  // 0 NaN, 1 +inf, 2 -inf, 3 +inf here and NaN at a random place
          for (bool with_smooth : {false, true}) {
            std::vector<uint16_t> x(static_cast<size_t>(H));
            for (auto& v : x) v = float_to_half(dt, nd(rng) * 3.f);
            x[static_cast<size_t>(pos)] = kind == 0 ? half_nan(dt) : half_inf(dt, kind == 2);
            if (kind == 3) x[rng() % static_cast<uint32_t>(H)] = half_nan(dt);
            std::vector<float> smooth(static_cast<size_t>(H));
            for (auto& v : smooth) v = 0.5f + std::fabs(nd(rng));
            const float* sm = with_smooth ? smooth.data() : nullptr;
            std::vector<int8_t> want(static_cast<size_t>(H), 77), got(static_cast<size_t>(H), 99);
            float want_scale = -1.f, got_scale = -2.f;
            dynamic_quant_row(dt, x.data(), sm, H, want.data(), &want_scale);
            dynamic_quant_row_fast(dt, x.data(), sm, H, got.data(), &got_scale);
            const std::string what = std::string(dtype_name(dt)) + " H=" + std::to_string(H) + " pos=" + std::to_string(pos) +
                                     " kind=" + std::to_string(kind) + (with_smooth ? " smooth" : "");
            EXPECT_EQ(float_bits(got_scale), float_bits(want_scale)) << what;
            EXPECT_EQ(got, want) << what;
            // The rule itself, on both.
            const bool nan = kind == 0 || kind == 3;
            EXPECT_EQ(float_bits(got_scale), nan ? kQuietNan : 0x7f800000u) << what;
            for (int64_t h = 0; h < H; ++h) {
              const float xf = half_to_float(dt, x[static_cast<size_t>(h)]);
              const int8_t expect = nan || !std::isinf(xf) ? 0 : xf > 0 ? 127 : -127;
              if (got[static_cast<size_t>(h)] != expect) {
                ADD_FAILURE() << what << " h=" << h << ": q=" << int{got[static_cast<size_t>(h)]} << ", want " << int{expect};
                break;
              }
            }
          }
        }
      }
    }
  }
}

TEST(CommQuant, NonFiniteGroups) {
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    // Group 0 finite, group 1 with a NaN, group 2 with +inf and -inf, group 3 (partial) with NaN and inf.
    std::vector<float> v = {1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3};
    std::vector<uint16_t> y;
    for (float f : v) y.push_back(float_to_half(dt, f));
    y[10] = half_nan(dt);
    y[17] = half_inf(dt, false);
    y[20] = half_inf(dt, true);
    y[24] = half_inf(dt, false);
    y[26] = half_nan(dt);
    const int64_t H = static_cast<int64_t>(y.size());
    std::vector<unsigned char> packed(static_cast<size_t>(comm_quant_row_bytes(H)), 0xAB);
    comm_quant_row(dt, y.data(), H, packed.data());
    auto q = [&](int64_t h) { return static_cast<int8_t>(packed[static_cast<size_t>(h)]); };
    EXPECT_EQ(q(7), 127) << dtype_name(dt);
    EXPECT_TRUE(std::isnan(half_to_float(dt, stored_scale(packed, H, 1)))) << dtype_name(dt);
    EXPECT_TRUE(std::isnan(half_to_float(dt, stored_scale(packed, H, 3)))) << dtype_name(dt);
    EXPECT_EQ(stored_scale(packed, H, 2), half_inf(dt, false)) << dtype_name(dt);
    for (int64_t h = 8; h < 16; ++h) EXPECT_EQ(q(h), 0) << dtype_name(dt) << " h=" << h;
    for (int64_t h = 16; h < 24; ++h) EXPECT_EQ(q(h), h == 17 ? 127 : h == 20 ? -127 : 0) << dtype_name(dt) << " h=" << h;
    for (int64_t h = 24; h < H; ++h) EXPECT_EQ(q(h), 0) << dtype_name(dt) << " h=" << h;
    // Dequantized: the NaN groups are NaN throughout; the inf group is +-inf at the infinities and
    // NaN (0 * inf) elsewhere; the finite group is untouched.
    std::vector<float> out(static_cast<size_t>(H));
    comm_dequant_row(dt, packed.data(), H, out.data());
    for (int64_t h = 8; h < 16; ++h) EXPECT_TRUE(std::isnan(out[static_cast<size_t>(h)])) << dtype_name(dt) << " h=" << h;
    for (int64_t h = 24; h < H; ++h) EXPECT_TRUE(std::isnan(out[static_cast<size_t>(h)])) << dtype_name(dt) << " h=" << h;
    EXPECT_EQ(out[17], std::numeric_limits<float>::infinity());
    EXPECT_EQ(out[20], -std::numeric_limits<float>::infinity());
    EXPECT_TRUE(std::isnan(out[16]));
    EXPECT_FALSE(std::isnan(out[7]));
  }
}

// ---------------------------------------------------------------------------------------------
// comm_quant_mode 2, the ops' vectorized kernels (comm_quant_row_fast, comm_dequant_row_fast and
// reduce_terms with int8 terms) against the plain formula the reference uses: every byte of the
// packed row, every bit of the dequantized floats and of the reduced output.

// One row of groups of 8 for the kernels: each group of one kind. 0: normal values times 2^e (e per
// group, over most of the dtype's range); 1: raw bit patterns (NaN, inf, subnormals); 2: zeros and
// -0; 3: subnormals only (bfloat16: the scale falls below the normal floats); 4: a NaN in a normal
// group; 5: +inf and -inf in a normal group; 6: exact halves with max 127 (ties of the int8
// rounding); 7: a NaN and an inf. `mixed` false: kind 0 only.
std::vector<uint16_t> comm_quant_input(DType dt, int64_t n, bool mixed, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  const bool bf = dt == DType::kBFloat16;
  std::uniform_int_distribution<int> ex(bf ? -60 : -12, bf ? 60 : 10);
  std::vector<uint16_t> y(static_cast<size_t>(n));
  for (int64_t g0 = 0; g0 < n; g0 += 8) {
    const int kind = mixed ? static_cast<int>(rng() % 8) : 0;
    const float scale = std::ldexp(1.0f, ex(rng));
    const int64_t g1 = std::min<int64_t>(n, g0 + 8);
    for (int64_t h = g0; h < g1; ++h) {
      uint16_t v = float_to_half(dt, nd(rng) * scale);
      if (kind == 1) v = static_cast<uint16_t>(rng());
      if (kind == 2) v = rng() % 2 ? uint16_t{0x8000} : uint16_t{0};
      if (kind == 3) v = static_cast<uint16_t>((rng() & 0x83ff) & (bf ? 0x807f : 0x83ff));  // exponent 0
      if (kind == 6) v = float_to_half(dt, h == g0 ? 127.f : static_cast<float>(static_cast<int>(rng() % 253) - 126) + 0.5f);
      y[static_cast<size_t>(h)] = v;
    }
    const int64_t at = g0 + static_cast<int64_t>(rng() % static_cast<uint32_t>(g1 - g0));
    if (kind == 4 || kind == 7) y[static_cast<size_t>(at)] = half_nan(dt);
    if (kind == 5 || kind == 7) y[static_cast<size_t>(g0 + (at - g0 + 1) % (g1 - g0))] = half_inf(dt, rng() % 2);
    if (kind == 5) y[static_cast<size_t>(g0 + (at - g0 + 2) % (g1 - g0))] = half_inf(dt, true);
  }
  return y;
}

// The packed row and the dequantized floats of the fast kernels equal the plain formula's, byte for
// byte, for `y` (H elements). Returns "" or what differs first.
std::string comm_quant_fast_vs_plain(DType dt, const uint16_t* y, int64_t H) {
  const size_t bytes = static_cast<size_t>(comm_quant_row_bytes(H));
  std::vector<unsigned char> want(bytes + 8, 0xAB), got(bytes + 8, 0xCD);
  comm_quant_row(dt, y, H, want.data());
  comm_quant_row_fast(dt, y, H, got.data());
  for (size_t i = 0; i < bytes; ++i)
    if (want[i] != got[i]) {
      const bool is_scale = i >= static_cast<size_t>(H);
      const int64_t h = is_scale ? (static_cast<int64_t>(i) - H) / 2 * 8 : static_cast<int64_t>(i);
      std::ostringstream os;
      os << dtype_name(dt) << " H=" << H << (is_scale ? " scale byte " : " q ") << i << " (group at " << h << "): got 0x" << std::hex
         << int{got[i]} << ", want 0x" << int{want[i]} << "; group:";
      for (int64_t j = h - h % 8; j < std::min(H, h - h % 8 + 8); ++j) os << " 0x" << y[j];
      return os.str();
    }
  if (got[bytes] != 0xCD) return std::string(dtype_name(dt)) + " H=" + std::to_string(H) + ": wrote past the packed row";
  std::vector<float> dwant(static_cast<size_t>(H)), dgot(static_cast<size_t>(H) + 1, 7.f);
  comm_dequant_row(dt, want.data(), H, dwant.data());
  comm_dequant_row_fast(dt, want.data(), H, dgot.data());
  for (int64_t h = 0; h < H; ++h)
    if (float_bits(dwant[static_cast<size_t>(h)]) != float_bits(dgot[static_cast<size_t>(h)]))
      return std::string(dtype_name(dt)) + " H=" + std::to_string(H) + " dequant h=" + std::to_string(h) + ": got " +
             std::to_string(dgot[static_cast<size_t>(h)]) + ", want " + std::to_string(dwant[static_cast<size_t>(h)]);
  if (dgot[static_cast<size_t>(H)] != 7.f) return std::string(dtype_name(dt)) + " H=" + std::to_string(H) + ": dequant wrote past H";
  return "";
}

// Every H from 1 to 7168 (each tail of the vectors and of the groups), rows of normal values and rows
// mixing every kind of group.
TEST(CommQuantFast, EveryLengthMatchesPlainFormula) {
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    for (bool mixed : {false, true}) {
      std::mt19937 rng(mixed ? 21 : 20);
      const std::vector<uint16_t> y = comm_quant_input(dt, 7168, mixed, rng);
      int bad = 0;
      for (int64_t H = 1; H <= 7168 && bad < 3; ++H) {
        const std::string d = comm_quant_fast_vs_plain(dt, y.data(), H);
        if (!d.empty()) {
          ++bad;
          ADD_FAILURE() << (mixed ? "mixed groups: " : "normal values: ") << d;
        }
      }
    }
  }
}

// Many distinct values: the quotient f * (1/s) leaves the float16 rounding in doubt in about one
// vector of 16 in 30, so these rows take the exact-division fallback thousands of times (a kernel
// without that fallback differs from the plain formula on these rows).
TEST(CommQuantFast, ManyRowsMatchPlainFormula) {
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    std::mt19937 rng(dt == DType::kBFloat16 ? 31 : 32);
    int bad = 0;
    for (int row = 0; row < 600 && bad < 3; ++row) {
      const int64_t H = row % 3 == 0 ? 7168 : 7168 - static_cast<int64_t>(rng() % 40);
      const std::vector<uint16_t> y = comm_quant_input(dt, H, row % 4 == 3, rng);
      const std::string d = comm_quant_fast_vs_plain(dt, y.data(), H);
      if (!d.empty()) {
        ++bad;
        ADD_FAILURE() << "row " << row << ": " << d;
      }
    }
  }
}

// Hand-checked: halves and the largest value; the float16 rounding of f / s decides the ties.
TEST(CommQuantFast, TiesOfTheInt8Rounding) {
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    const auto y = halves(dt, {127, 2.5f, -3.5f, 0.5f, 1.5f, -0.5f, 126.5f, -127, 127, 1, 2, 3, 4, 5, 6, 7});
    std::vector<unsigned char> packed(static_cast<size_t>(comm_quant_row_bytes(16)));
    comm_quant_row_fast(dt, y.data(), 16, packed.data());
    // s = fp32(127 * fp32(1/127)) is 1 - 2^-24 or 1; either way f / s rounds to f in float16.
    const int8_t want[16] = {127, 2, -4, 0, 2, 0, 126, -127, 127, 1, 2, 3, 4, 5, 6, 7};
    for (int i = 0; i < 16; ++i) EXPECT_EQ(static_cast<int8_t>(packed[static_cast<size_t>(i)]), want[i]) << dtype_name(dt) << " h=" << i;
    EXPECT_EQ(comm_quant_fast_vs_plain(dt, y.data(), 16), "");
  }
}

// reduce_terms with int8 terms (comm_quant_mode 2 rows) mixed with half rows, against the plain
// sequence: acc = acc + round_to(float(q) * scale) * w (or without w), bit for bit, NaN payloads too.
TEST(ReduceTerms, Int8TermsMatchPlainRoundingSequence) {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    for (int64_t H : {1, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 63, 64, 65, 100, 129, 1000, 7167, 7168}) {
      for (int n : {1, 2, 5, 9}) {
        for (bool mixed : {false, true}) {
          std::vector<std::vector<uint16_t>> rows(static_cast<size_t>(n));
          std::vector<std::vector<unsigned char>> packed(static_cast<size_t>(n));
          std::vector<std::vector<float>> deq(static_cast<size_t>(n));
          std::vector<RowTerm> terms;
          for (int i = 0; i < n; ++i) {
            const bool int8_term = i % 4 != 3;
            rows[static_cast<size_t>(i)] = comm_quant_input(dt, H, mixed && i == 1, rng);
            RowTerm t{rows[static_cast<size_t>(i)].data(), nd(rng), i % 3 != 2};
            if (int8_term) {
              packed[static_cast<size_t>(i)].resize(static_cast<size_t>(comm_quant_row_bytes(H)));
              comm_quant_row(dt, rows[static_cast<size_t>(i)].data(), H, packed[static_cast<size_t>(i)].data());
              deq[static_cast<size_t>(i)].resize(static_cast<size_t>(H));
              comm_dequant_row(dt, packed[static_cast<size_t>(i)].data(), H, deq[static_cast<size_t>(i)].data());
              t.packed = packed[static_cast<size_t>(i)].data();
              t.row = nullptr;
            }
            terms.push_back(t);
          }
          std::vector<uint16_t> out(static_cast<size_t>(H), 0xdead);
          if (dt == DType::kBFloat16)
            reduce_terms_bf16(out.data(), terms.data(), n, H);
          else
            reduce_terms_fp16(out.data(), terms.data(), n, H);
          int bad = 0;
          for (int64_t h = 0; h < H && bad < 3; ++h) {
            float acc = 0.f;
            for (int i = 0; i < n; ++i) {
              const RowTerm& t = terms[static_cast<size_t>(i)];
              const float v = t.packed ? deq[static_cast<size_t>(i)][static_cast<size_t>(h)] : half_to_float(dt, t.row[h]);
              const volatile float term = t.weighted ? v * t.w : v;  // rounded on its own, never fused
              acc = acc + term;
            }
            const uint16_t want = float_to_half(dt, acc), got = out[static_cast<size_t>(h)];
            if (got != want) {
              ++bad;
              ADD_FAILURE() << dtype_name(dt) << " H=" << H << " terms=" << n << (mixed ? " mixed" : "") << " element " << h << ": got 0x"
                            << std::hex << got << ", want 0x" << want;
            }
          }
        }
      }
    }
  }
}

TEST(Tensor, DtypeSizeAndName) {
  const std::pair<DType, std::pair<size_t, const char*>> all[] = {
      {DType::kBFloat16, {2, "bfloat16"}}, {DType::kFloat16, {2, "float16"}}, {DType::kFloat32, {4, "float32"}},
      {DType::kInt8, {1, "int8"}},         {DType::kInt32, {4, "int32"}},     {DType::kInt64, {8, "int64"}},
      {DType::kBool, {1, "bool"}}};
  for (const auto& [dt, sn] : all) {
    EXPECT_EQ(dtype_size(dt), sn.first) << sn.second;
    EXPECT_STREQ(dtype_name(dt), sn.second);
  }
}

TEST(Tensor, ShapeStr) {
  int x = 0;
  EXPECT_EQ(TensorView(&x, DType::kInt32, {4, 7168}).shape_str(), "(4, 7168)");
  EXPECT_EQ(TensorView(&x, DType::kInt32, {5}).shape_str(), "(5,)");
  EXPECT_EQ(TensorView(&x, DType::kInt32, {}).shape_str(), "()");
  EXPECT_EQ(TensorView(&x, DType::kInt32, {2, 3, 4}).shape_str(), "(2, 3, 4)");
  EXPECT_EQ(TensorView(&x, DType::kInt32, {0, 16}).shape_str(), "(0, 16)");
}

TEST(Tensor, ContiguityAndStrides) {
  int x = 0;
  EXPECT_TRUE(TensorView(&x, DType::kInt32, {3, 16}).is_contiguous());
  EXPECT_TRUE(TensorView(&x, DType::kInt32, {3, 16}, {16, 1}).is_contiguous());
  EXPECT_FALSE(TensorView(&x, DType::kInt32, {3, 16}, {17, 1}).is_contiguous());  // padded rows
  EXPECT_FALSE(TensorView(&x, DType::kInt32, {3, 4}, {1, 3}).is_contiguous());    // transposed
  EXPECT_FALSE(TensorView(&x, DType::kInt32, {6}, {2}).is_contiguous());
  // Size-1 dimensions may carry any stride.
  EXPECT_TRUE(TensorView(&x, DType::kInt32, {1, 16}, {999, 1}).is_contiguous());
  EXPECT_TRUE(TensorView(&x, DType::kInt32, {3, 1}, {1, 42}).is_contiguous());
  TensorView v(&x, DType::kInt32, {2, 3, 4});
  EXPECT_EQ(v.stride(0), 12);
  EXPECT_EQ(v.stride(1), 4);
  EXPECT_EQ(v.stride(2), 1);
  EXPECT_EQ(v.numel(), 24);
  EXPECT_EQ(v.dim(), 3);
  EXPECT_EQ(v.size(1), 3);
  TensorView s(&x, DType::kInt32, {3, 4}, {10, 2});
  EXPECT_EQ(s.stride(0), 10);
  EXPECT_EQ(s.stride(1), 2);
  EXPECT_FALSE(TensorView().defined());
  EXPECT_TRUE(v.defined());
}

TEST(Tensor, AtAddressing) {
  std::vector<int32_t> buf(64);
  for (int i = 0; i < 64; ++i) buf[static_cast<size_t>(i)] = i;
  TensorView c(buf.data(), DType::kInt32, {3, 4});
  EXPECT_EQ(c.at({1, 2}), static_cast<const void*>(buf.data() + 6));
  EXPECT_EQ(*static_cast<const int32_t*>(c.at({2, 3})), 11);
  TensorView s(buf.data(), DType::kInt32, {3, 4}, {8, 2});
  EXPECT_EQ(*static_cast<const int32_t*>(s.at({1, 2})), 12);
  EXPECT_EQ(*static_cast<const int32_t*>(s.at({2, 3})), 22);
  TensorView t(buf.data(), DType::kInt32, {4, 3}, {1, 4});  // transposed view of (3, 4)
  EXPECT_EQ(*static_cast<const int32_t*>(t.at({3, 1})), 7);
  // Element size follows the dtype: 2-byte halves, 8-byte int64.
  TensorView h(buf.data(), DType::kBFloat16, {4, 5});
  EXPECT_EQ(static_cast<const unsigned char*>(h.at({1, 3})) - reinterpret_cast<const unsigned char*>(buf.data()), (5 + 3) * 2);
  TensorView l(buf.data(), DType::kInt64, {8}, {3});
  EXPECT_EQ(static_cast<const unsigned char*>(l.at({2})) - reinterpret_cast<const unsigned char*>(buf.data()), 2 * 3 * 8);
  TensorView b(buf.data(), DType::kBool, {2, 2, 2});
  EXPECT_EQ(static_cast<const unsigned char*>(b.at({1, 1, 1})) - reinterpret_cast<const unsigned char*>(buf.data()), 7);
  // at1/at2 helpers of the config layer read through strides.
  EXPECT_EQ(at2<int32_t>(s, 2, 1), 18);
  EXPECT_EQ(at1<int32_t>(TensorView(buf.data(), DType::kInt32, {5}, {7}), 4), 28);
}

TEST(Tensor, OwningTensor) {
  Tensor t(DType::kFloat32, {3, 5});
  EXPECT_EQ(t.numel(), 15);
  EXPECT_EQ(t.nbytes(), 60u);
  EXPECT_EQ(t.dim(), 2);
  EXPECT_EQ(t.size(1), 5);
  EXPECT_TRUE(t.defined());
  for (int i = 0; i < 15; ++i) EXPECT_EQ(t.data_as<float>()[i], 0.0f) << "zero-initialised";
  TensorView v = t;
  EXPECT_EQ(v.data, t.data());
  EXPECT_EQ(v.dtype, DType::kFloat32);
  EXPECT_EQ(v.shape, (std::vector<int64_t>{3, 5}));
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_EQ(v.shape_str(), "(3, 5)");
  Tensor e(DType::kInt32, {0, 7});
  EXPECT_EQ(e.numel(), 0);
  EXPECT_EQ(e.nbytes(), 0u);
  EXPECT_TRUE(e.defined());
  Tensor i8(DType::kInt8, {9});
  EXPECT_EQ(i8.nbytes(), 9u);
  Tensor i64(DType::kInt64, {2, 2});
  EXPECT_EQ(i64.nbytes(), 32u);
  EXPECT_FALSE(Tensor().defined());
}

}  // namespace
}  // namespace moedist::core
