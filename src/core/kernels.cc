#include "core/kernels.h"

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

void reduce_terms_bf16(uint16_t* out, const RowTerm* terms, int n, int64_t H) {
  int64_t done = 0;
#ifdef MOEDIST_X86_KERNELS
  if (have_avx512()) done = reduce_terms_avx512<DType::kBFloat16>(out, terms, n, H);
#endif
  if (done < H) reduce_terms_portable_bf16(out, terms, n, done, H);
}
void reduce_terms_fp16(uint16_t* out, const RowTerm* terms, int n, int64_t H) {
  int64_t done = 0;
#ifdef MOEDIST_X86_KERNELS
  if (have_avx512()) done = reduce_terms_avx512<DType::kFloat16>(out, terms, n, H);
#endif
  if (done < H) reduce_terms_portable_fp16(out, terms, n, done, H);
}

}  // namespace moedist::core
