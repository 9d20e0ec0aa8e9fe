#include "core/kernels.h"

#include <cstring>

#include "core/quant.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
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
      const uint16_t* __restrict y = terms[i].row + h0;
      const float w = terms[i].w;
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

__attribute__((target("avx512f,avx512bw"))) inline __m512 widen_bf16_512(const uint16_t* p) {
  const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
__attribute__((target("avx512f,avx512bw"))) inline __m512 widen_fp16_512(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));  // exact, like fp16_to_float
}

template <DType kDt>
__attribute__((target("avx512f,avx512bw"))) int64_t reduce_terms_avx512(uint16_t* __restrict out, const RowTerm* terms, int n, int64_t H) {
  int64_t h0 = 0;
  for (; h0 + kVec512 <= H; h0 += kVec512) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int i = 0; i < n; ++i) {
      const uint16_t* y = terms[i].row + h0;
      __m512 y0, y1;
      if (kDt == DType::kBFloat16) {
        y0 = widen_bf16_512(y);
        y1 = widen_bf16_512(y + 16);
      } else {
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
__attribute__((target("avx512f,avx512bw"))) inline __m512 quant_input_512(DType dt, const uint16_t* x, const float* smooth, int64_t h) {
  __m512 v = dt == DType::kBFloat16 ? widen_bf16_512(x + h) : widen_fp16_512(x + h);
  if (smooth) v = _mm512_mul_ps(v, _mm512_loadu_ps(smooth + h));
  return v;
}

// dynamic_quant_row, 16 elements at a time: amax with max (the lanes are non-negative, so the order
// of the horizontal max does not matter) and a mask of NaN lanes, then q = rint_even(xf * m) with
// saturation. Returns false (nothing done) when H is not a multiple of 16 or the row holds a NaN or
// an infinity; the caller then runs the plain version, which owns the rule for non-finite rows.
__attribute__((target("avx512f,avx512bw"))) bool dynamic_quant_avx512(DType dt, const uint16_t* x, const float* smooth, int64_t H,
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

bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
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

}  // namespace moedist::core
