#include "core/kernels.h"

#include <cstring>

#include "core/quant.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) && \
    !defined(MOEDIST_ASAN) && !defined(MOEDIST_TSAN)
#define MOEDIST_X86_KERNELS 1
#include <immintrin.h>
// GCC 12 warns inside its own AVX-512 headers (the "undefined" source operand of some intrinsics).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace moedist::core {

namespace {
constexpr int64_t kChunk = 128;  // floats of the accumulator kept in registers / L1 across terms

inline float widen(DType dt, uint16_t v) {
  if (dt == DType::kBFloat16) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return fp16_to_float(v);
}

// Portable version, for elements [h_begin, H): the reference rounding sequence written plainly.
template <DType kDt>
inline void reduce_terms_impl(uint16_t* __restrict out, const RowTerm* terms, int n, int64_t h_begin, int64_t H) {
  float acc[kChunk];
  for (int64_t h0 = h_begin; h0 < H; h0 += kChunk) {
    const int64_t m = H - h0 < kChunk ? H - h0 : kChunk;
    for (int64_t j = 0; j < m; ++j) acc[j] = 0.f;
    for (int i = 0; i < n; ++i) {
      const float w = terms[i].w;
      if (terms[i].packed) {  // comm_quant_mode 2 row: dequantized as core::comm_dequant_row, then weighted
        const int8_t* q = static_cast<const int8_t*>(terms[i].packed);
        const unsigned char* scales = reinterpret_cast<const unsigned char*>(q + H);
        for (int64_t j = 0; j < m; ++j) {
          const int64_t h = h0 + j;
          uint16_t stored;
          std::memcpy(&stored, scales + (h / 8) * 2, 2);
          const float v = round_to(kDt, static_cast<float>(q[h]) * widen(kDt, stored));
          const float term = terms[i].weighted ? v * w : v;
          acc[j] = acc[j] + term;
        }
        continue;
      }
      const uint16_t* __restrict y = terms[i].row + h0;
      if (terms[i].weighted) {
        for (int64_t j = 0; j < m; ++j) {
          const float prod = widen(kDt, y[j]) * w;
          acc[j] = acc[j] + prod;
        }
      } else {
        for (int64_t j = 0; j < m; ++j) acc[j] = acc[j] + widen(kDt, y[j]);
      }
    }
    if (kDt == DType::kBFloat16)
      for (int64_t j = 0; j < m; ++j) out[h0 + j] = float_to_bf16(acc[j]);
    else
      for (int64_t j = 0; j < m; ++j) out[h0 + j] = float_to_fp16(acc[j]);
  }
}

#ifdef MOEDIST_X86_KERNELS
// Explicit vector versions: the same operations per element (widen exactly, multiply rounded to fp32,
// add rounded to fp32, never fused; then round to nearest even with the scalar code's NaN rule), 32
// elements at a time in two registers. They return how many leading elements they did; the portable
// code does the rest. About twice the speed of what the compiler makes of the portable loop.
constexpr int64_t kVec512 = 32;
#define MOEDIST_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))

MOEDIST_AVX512 inline __m512 widen_bf16_512(const uint16_t* p) {
  const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
MOEDIST_AVX512 inline __m512 widen_fp16_512(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));  // exact, like fp16_to_float
}

// round_to(dt, x) on 16 lanes: the nearest bfloat16 / float16 (ties to even) as a float, NaN lanes as
// the scalar code makes them (bfloat16: the top half with the quiet bit set; float16: sign | quiet NaN).
template <DType kDt>
MOEDIST_AVX512 inline __m512 round_to_512(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  if (kDt == DType::kBFloat16) {
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), hi);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_and_si512(_mm512_or_si512(u, _mm512_set1_epi32(0x400000)), hi));
    return _mm512_castsi512_ps(r);
  }
  __m512 r = _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i qnan = _mm512_or_si512(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0x80000000u))), _mm512_set1_epi32(0x7fc00000));
  return _mm512_mask_mov_ps(r, nan, _mm512_castsi512_ps(qnan));
}

// The stored scales of groups g .. g + n - 1 (n <= 4) of a packed row, widened to float, in lanes 0 .. n-1.
template <DType kDt>
MOEDIST_AVX512 inline __m128 load_scales(const unsigned char* p, int n) {
  uint64_t bits = 0;
  std::memcpy(&bits, p, static_cast<size_t>(n) * 2);
  const __m128i s = _mm_cvtsi64_si128(static_cast<long long>(bits));
  if (kDt == DType::kBFloat16) return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(s), 16));
  return _mm_cvtph_ps(s);
}

// Dequantized values of a packed row (core::comm_dequant_row) for the 16 elements from h (a multiple
// of 8): q times its group's scale (`sc`, lanes 0-7 and 8-15), rounded to the dtype.
template <DType kDt>
MOEDIST_AVX512 inline __m512 dequant_16(const int8_t* q, __m512 sc) {
  const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  return round_to_512<kDt>(_mm512_mul_ps(qf, sc));
}

template <DType kDt>
MOEDIST_AVX512 int64_t reduce_terms_avx512(uint16_t* __restrict out, const RowTerm* terms, int n, int64_t H) {
  int64_t h0 = 0;
  for (; h0 + kVec512 <= H; h0 += kVec512) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int i = 0; i < n; ++i) {
      __m512 y0, y1;
      if (terms[i].packed) {  // four groups of 8: scales g .. g+3 spread over the lanes
        const int8_t* q = static_cast<const int8_t*>(terms[i].packed);
        const __m512 s4 = _mm512_castps128_ps512(load_scales<kDt>(reinterpret_cast<const unsigned char*>(q + H) + (h0 / 8) * 2, 4));
        const __m512i lo = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m512i hi = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
        y0 = dequant_16<kDt>(q + h0, _mm512_permutexvar_ps(lo, s4));
        y1 = dequant_16<kDt>(q + h0 + 16, _mm512_permutexvar_ps(hi, s4));
      } else if (kDt == DType::kBFloat16) {
        const uint16_t* y = terms[i].row + h0;
        y0 = widen_bf16_512(y);
        y1 = widen_bf16_512(y + 16);
      } else {
        const uint16_t* y = terms[i].row + h0;
        y0 = widen_fp16_512(y);
        y1 = widen_fp16_512(y + 16);
      }
      if (terms[i].weighted) {
        const __m512 w = _mm512_set1_ps(terms[i].w);
        y0 = _mm512_mul_ps(y0, w);
        y1 = _mm512_mul_ps(y1, w);
      }
      a0 = _mm512_add_ps(a0, y0);
      a1 = _mm512_add_ps(a1, y1);
    }
    if (kDt == DType::kBFloat16) {
      const __m512 acc[2] = {a0, a1};
      for (int v = 0; v < 2; ++v) {
        const __m512i u = _mm512_castps_si512(acc[v]);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h0 + 16 * v), _mm512_cvtepi32_epi16(r));
      }
    } else {
      alignas(64) float acc[kVec512];
      _mm512_store_ps(acc, a0);
      _mm512_store_ps(acc + 16, a1);
      for (int64_t j = 0; j < kVec512; ++j) out[h0 + j] = float_to_fp16(acc[j]);
    }
  }
  return h0;
}

// xf of dynamic_quant_row for elements [h, h + 16): widened, times the smooth scale (rounded, not fused).
MOEDIST_AVX512 inline __m512 quant_input_512(DType dt, const uint16_t* x, const float* smooth, int64_t h) {
  __m512 v = dt == DType::kBFloat16 ? widen_bf16_512(x + h) : widen_fp16_512(x + h);
  if (smooth) v = _mm512_mul_ps(v, _mm512_loadu_ps(smooth + h));
  return v;
}

// dynamic_quant_row, 16 elements at a time: amax with max (the lanes are non-negative, so the order
// of the horizontal max does not matter) and a mask of NaN lanes, then q = rint_even(xf * m) with
// saturation. Returns false (nothing done) when H is not a multiple of 16 or the row holds a NaN or
// an infinity; the caller then runs the plain version, which owns the rule for non-finite rows.
MOEDIST_AVX512 bool dynamic_quant_avx512(DType dt, const uint16_t* x, const float* smooth, int64_t H,
                                                                     int8_t* q, float* scale) {
  if (H % 16 != 0) return false;
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 any_nan = 0;
  for (int64_t h = 0; h < H; h += 16) {
    const __m512 a = _mm512_abs_ps(quant_input_512(dt, x, smooth, h));
    any_nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(a, vmax);  // a NaN lane keeps vmax: caught by any_nan
  }
  if (any_nan) return false;
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, vmax);
  float amax = 0.f;
  for (float a : lanes)
    if (a > amax) amax = a;
  if (amax > 3.4028235e38f) return false;  // +inf
  if (amax == 0.f) {
    std::memset(q, 0, static_cast<size_t>(H));
    *scale = 0.f;
    return true;
  }
  const float m = 127.0f / amax;
  const __m512 vm = _mm512_set1_ps(m), lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
  for (int64_t h = 0; h < H; h += 16) {
    const __m512 v = _mm512_mul_ps(quant_input_512(dt, x, smooth, h), vm);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    const __m512i i = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~nan), _mm512_cvtps_epi32(r));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + h), _mm512_cvtsepi32_epi8(i));
  }
  *scale = 1.0f / m;
  return true;
}

// comm_quant_row for the elements [0, returned) (a multiple of 32), four groups of 8 per iteration.
// Per group (docs/semantics.md §13): m = max |f|, s = m * (1/127), the stored scale s rounded to the
// dtype, and q = rint(fp16(f / s)). m is taken on the 16-bit patterns with the sign cleared (their
// order is the order of the magnitudes, and a NaN is above every number, so it is seen): a group of 8
// is one 128-bit lane. Instead of dividing every element, a = f * r with r = 1/s (one division per
// group, correctly rounded), so |a - x| <= 2^-23 |a| (1 + 2^-22) < 2 units in the last place of a,
// x the exact quotient; float32(x) is then within 2 ulp of a as well (rounding is monotone and a +- 2
// ulp are floats). float16 rounding of a float32 in the float16 normal range drops its 13 low mantissa
// bits, with the midpoints (where the direction changes) at low bits 0x1000: when a's low bits are
// more than 4 away from 0x1000, no midpoint lies within 2 ulp of a (a power of two, where the binade
// changes, is a float16 value, far from any midpoint), so fp16(float32(x)) = fp16(a), the value the
// plain code gets. Otherwise (on normal data about one vector of 16 in 30) the 16 elements take the
// exact division f / s.
// Below the float16 normal range (|a| < 2^-14) the test means nothing, but there every candidate
// rounds to the int8 0. Groups holding a NaN or an infinity, and groups with 0 < m < 2^-118 (a scale
// outside the normal floats), are done by the plain code. A group of zeros: r = 0, q = 0, scale 0.
template <DType kDt>
MOEDIST_AVX512 int64_t comm_quant_avx512(const uint16_t* y, int64_t H, void* packed) {
  int8_t* q = static_cast<int8_t*>(packed);
  unsigned char* scales = reinterpret_cast<unsigned char*>(q + H);
  const bool bf = kDt == DType::kBFloat16;
  const __m128 inv127 = _mm_set1_ps(1.0f / 127.0f), one = _mm_set1_ps(1.0f);
  const __m512 zero = _mm512_setzero_ps();
  const __m512i low13 = _mm512_set1_epi32(0x1fff), near_lo = _mm512_set1_epi32(0x1000 - 4), near_width = _mm512_set1_epi32(8);
  const __m512i abs_mask = _mm512_set1_epi16(0x7fff);
  const __m512i nonfinite = _mm512_set1_epi16(static_cast<int16_t>(bf ? 0x7f80 : 0x7c00));
  const __m512i tiny = _mm512_set1_epi16(static_cast<int16_t>(bf ? 0x0480 : 0));  // bfloat16 2^-118; float16: none
  const __m512i firsts = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 24, 16, 8, 0);
  const __m512i spread[2] = {_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                             _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2)};
  int64_t h0 = 0;
  for (; h0 + 32 <= H; h0 += 32) {
    const __m512i raw = _mm512_loadu_si512(y + h0);
    const __m512i ab = _mm512_and_si512(raw, abs_mask);
    // every word gets its group's maximum: swap 64-bit halves, 32-bit pairs, then words
    __m512i m = _mm512_max_epu16(ab, _mm512_shuffle_epi32(ab, static_cast<_MM_PERM_ENUM>(0x4E)));
    m = _mm512_max_epu16(m, _mm512_shuffle_epi32(m, static_cast<_MM_PERM_ENUM>(0xB1)));
    m = _mm512_max_epu16(m, _mm512_rol_epi32(m, 16));
    if (_mm512_cmpge_epu16_mask(m, nonfinite) | (_mm512_cmplt_epu16_mask(m, tiny) & _mm512_test_epi16_mask(m, m))) {
      comm_quant_groups(kDt, y, H, h0, h0 + 32, packed);
      continue;
    }
    // the four groups' m, s, stored scale and 1/s in lanes 0-3
    const __m128i m4 = _mm512_castsi512_si128(_mm512_permutexvar_epi16(firsts, m));
    const __m128 mf = bf ? _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(m4), 16)) : _mm_cvtph_ps(m4);
    const __m128 s4 = _mm_mul_ps(mf, inv127);
    __m128i st;
    if (bf) {
      const __m128i u = _mm_castps_si128(s4);  // finite: the rounding without the NaN case
      const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
      const __m128i r = _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7fff)), lsb), 16);
      st = _mm_packus_epi32(r, r);
    } else {
      st = _mm_cvtps_ph(s4, _MM_FROUND_TO_NEAREST_INT);
    }
    _mm_storel_epi64(reinterpret_cast<__m128i*>(scales + (h0 / 8) * 2), st);
    const __m128 r4 = _mm_and_ps(_mm_div_ps(one, s4), _mm_cmpneq_ps(s4, _mm_setzero_ps()));  // s = 0: r = 0
    for (int half = 0; half < 2; ++half) {
      const __m256i raw16 = half ? _mm512_extracti64x4_epi64(raw, 1) : _mm512_castsi512_si256(raw);
      const __m512 f = bf ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw16), 16)) : _mm512_cvtph_ps(raw16);
      const __m512 r = _mm512_permutexvar_ps(spread[half], _mm512_castps128_ps512(r4));
      const __m512 a = _mm512_mul_ps(f, r);
      __m256i h = _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT);
      // low 13 bits of a in [0x1000 - 4, 0x1000 + 4]: a float16 midpoint may lie between a and x
      const __m512i low = _mm512_sub_epi32(_mm512_and_si512(_mm512_castps_si512(a), low13), near_lo);
      if (_mm512_cmple_epu32_mask(low, near_width)) {
        const __m512 s = _mm512_permutexvar_ps(spread[half], _mm512_castps128_ps512(s4));
        h = _mm512_cvtps_ph(_mm512_maskz_div_ps(_mm512_cmpneq_ps_mask(s, zero), f, s), _MM_FROUND_TO_NEAREST_INT);
      }
      // fp16 -> float (exact) -> int32 in the current rounding mode (nearest even, as nearbyint), saturated
      const __m512i qi = _mm512_cvtps_epi32(_mm512_cvtph_ps(h));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + h0 + 16 * half), _mm512_cvtsepi32_epi8(qi));
    }
  }
  return h0;
}

// comm_dequant_row for the elements [0, returned) (a multiple of 16).
template <DType kDt>
MOEDIST_AVX512 int64_t comm_dequant_avx512(const void* packed, int64_t H, float* out) {
  const int8_t* q = static_cast<const int8_t*>(packed);
  const unsigned char* scales = reinterpret_cast<const unsigned char*>(q + H);
  const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  int64_t h0 = 0;
  for (; h0 + 16 <= H; h0 += 16) {
    const __m512 sc = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(load_scales<kDt>(scales + (h0 / 8) * 2, 2)));
    _mm512_storeu_ps(out + h0, dequant_16<kDt>(q + h0, sc));
  }
  return h0;
}

bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  return yes;
}
#endif
}  // namespace

// Wider vectors where the CPU has them; every variant computes the same sequence of fp32 roundings.
#ifdef MOEDIST_X86_KERNELS
#define MOEDIST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MOEDIST_CLONES
#endif

namespace {
MOEDIST_CLONES void reduce_terms_portable_bf16(uint16_t* out, const RowTerm* terms, int n, int64_t h_begin, int64_t H) {
  reduce_terms_impl<DType::kBFloat16>(out, terms, n, h_begin, H);
}
MOEDIST_CLONES void reduce_terms_portable_fp16(uint16_t* out, const RowTerm* terms, int n, int64_t h_begin, int64_t H) {
  reduce_terms_impl<DType::kFloat16>(out, terms, n, h_begin, H);
}
}  // namespace

namespace {
// The vector kernel for as many leading elements as it takes, the portable code for the rest.
template <DType kDt>
void reduce_terms(uint16_t* out, const RowTerm* terms, int n, int64_t H) {
  int64_t done = 0;
#ifdef MOEDIST_X86_KERNELS
  if (have_avx512()) done = reduce_terms_avx512<kDt>(out, terms, n, H);
#endif
  if (done >= H) return;
  if (kDt == DType::kBFloat16)
    reduce_terms_portable_bf16(out, terms, n, done, H);
  else
    reduce_terms_portable_fp16(out, terms, n, done, H);
}
}  // namespace

void reduce_terms_bf16(uint16_t* out, const RowTerm* terms, int n, int64_t H) { reduce_terms<DType::kBFloat16>(out, terms, n, H); }
void reduce_terms_fp16(uint16_t* out, const RowTerm* terms, int n, int64_t H) { reduce_terms<DType::kFloat16>(out, terms, n, H); }

void dynamic_quant_row_fast(DType dt, const uint16_t* x, const float* smooth, int64_t H, int8_t* q, float* scale) {
#ifdef MOEDIST_X86_KERNELS
  if (have_avx512() && dynamic_quant_avx512(dt, x, smooth, H, q, scale)) return;
#endif
  dynamic_quant_row(dt, x, smooth, H, q, scale);
}

void comm_quant_row_fast(DType dt, const uint16_t* y, int64_t H, void* packed) {
  int64_t done = 0;
#ifdef MOEDIST_X86_KERNELS
  if (have_avx512())
    done = dt == DType::kBFloat16 ? comm_quant_avx512<DType::kBFloat16>(y, H, packed) : comm_quant_avx512<DType::kFloat16>(y, H, packed);
#endif
  if (done < H) comm_quant_groups(dt, y, H, done, H, packed);
}

void comm_dequant_row_fast(DType dt, const void* packed, int64_t H, float* out) {
  int64_t done = 0;
#ifdef MOEDIST_X86_KERNELS
  if (have_avx512())
    done = dt == DType::kBFloat16 ? comm_dequant_avx512<DType::kBFloat16>(packed, H, out) : comm_dequant_avx512<DType::kFloat16>(packed, H, out);
#endif
  const int8_t* q = static_cast<const int8_t*>(packed);
  const unsigned char* scales = reinterpret_cast<const unsigned char*>(q + H);
  for (int64_t h = done; h < H; ++h) {  // the plain formula of core::comm_dequant_row
    uint16_t stored;
    std::memcpy(&stored, scales + (h / 8) * 2, 2);
    out[h] = round_to(dt, static_cast<float>(q[h]) * half_to_float(dt, stored));
  }
}

}  // namespace moedist::core
