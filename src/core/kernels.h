// Row kernels of the hot paths, written so the compiler vectorizes them. Each output element is the
// spec's rounding sequence: the product rounded to fp32, then the sum rounded to fp32 (no FMA: the
// library is built with -ffp-contract=off), so vector and scalar code give the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/half.h"
#include "moedist/tensor.h"

namespace moedist::core {

// acc[h] += float(y[h]) * w
inline void axpy_bf16(float* __restrict acc, const uint16_t* __restrict y, float w, int64_t n) {
  for (int64_t h = 0; h < n; ++h) {
    const uint32_t bits = static_cast<uint32_t>(y[h]) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    const float prod = v * w;
    acc[h] = acc[h] + prod;
  }
}
// acc[h] += float(y[h])
inline void add_bf16(float* __restrict acc, const uint16_t* __restrict y, int64_t n) {
  for (int64_t h = 0; h < n; ++h) {
    const uint32_t bits = static_cast<uint32_t>(y[h]) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    acc[h] = acc[h] + v;
  }
}
inline void axpy_fp16(float* __restrict acc, const uint16_t* __restrict y, float w, int64_t n) {
  for (int64_t h = 0; h < n; ++h) {
    const float prod = fp16_to_float(y[h]) * w;
    acc[h] = acc[h] + prod;
  }
}
inline void add_fp16(float* __restrict acc, const uint16_t* __restrict y, int64_t n) {
  for (int64_t h = 0; h < n; ++h) acc[h] = acc[h] + fp16_to_float(y[h]);
}
// out[h] = round_to_nearest_even(acc[h]) as bf16
inline void store_bf16(uint16_t* __restrict out, const float* __restrict acc, int64_t n) {
  for (int64_t h = 0; h < n; ++h) out[h] = float_to_bf16(acc[h]);
}

// One term of a token's reduction: acc += float(row[h]) * w (weighted) or acc += float(row[h]).
// With `packed` set, the term's values are not `row` but the comm_quant_mode 2 row `packed` (quant.h's
// layout, H int8 then the group scales) dequantized as core::comm_dequant_row does:
// v = round_to_dt(float(q) * float(scale)), then acc += v * w or acc += v.
struct RowTerm {
  const uint16_t* row;
  float w;
  bool weighted;
  const void* packed = nullptr;
};
// out[h] = round(sum of the terms in order, in fp32), for H elements, processed in chunks so the
// accumulator stays in registers. The order of the terms is the order of summation.
void reduce_terms_bf16(uint16_t* out, const RowTerm* terms, int n, int64_t H);
void reduce_terms_fp16(uint16_t* out, const RowTerm* terms, int n, int64_t H);

// dispatch quant_mode 2 for the ops: the same bits as core::dynamic_quant_row (quant.h, the spec's
// formula written plainly, which the reference uses), vectorized where the CPU has AVX-512.
void dynamic_quant_row_fast(DType dt, const uint16_t* x, const float* smooth, int64_t H, int8_t* q, float* scale);

// combine comm_quant_mode 2 for the ops: the same bytes as core::comm_quant_row (quant.h), 32
// elements (four groups) at a time where the CPU has AVX-512 with F16C. The division f / s is
// replaced by f * (1/s) with a bound on its error; a vector where that bound leaves the float16
// rounding of the quotient in doubt, and every group holding a NaN, an infinity or a scale below the
// float range's normal numbers, takes the exact division / the plain code.
void comm_quant_row_fast(DType dt, const uint16_t* y, int64_t H, void* packed);
// core::comm_dequant_row, vectorized likewise (the same floats).
void comm_dequant_row_fast(DType dt, const void* packed, int64_t H, float* out);

}  // namespace moedist::core
