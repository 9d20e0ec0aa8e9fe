#include "core/kernels.h"

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

template <DType kDt>
inline void reduce_terms_impl(uint16_t* __restrict out, const RowTerm* terms, int n, int64_t H) {
  float acc[kChunk];
  for (int64_t h0 = 0; h0 < H; h0 += kChunk) {
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
}  // namespace

// Wider vectors where the CPU has them; every variant computes the same sequence of fp32 roundings.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define MOEDIST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOEDIST_CLONES
#endif

MOEDIST_CLONES void reduce_terms_bf16(uint16_t* out, const RowTerm* terms, int n, int64_t H) {
  reduce_terms_impl<DType::kBFloat16>(out, terms, n, H);
}
MOEDIST_CLONES void reduce_terms_fp16(uint16_t* out, const RowTerm* terms, int n, int64_t H) {
  reduce_terms_impl<DType::kFloat16>(out, terms, n, H);
}

}  // namespace moedist::core
