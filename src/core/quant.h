// The two int8 quantizations of the spec, shared by the reference and the ops (both must produce
// the same bits, and these functions are the spec's formulas written once).
#pragma once

#include <cstdint>

#include "moedist/tensor.h"

namespace moedist::core {

// dispatch quant_mode 2, one row (docs/semantics.md §5): xf = float(x) [* smooth]; amax = max|xf|;
// m = 127/amax; q = rint_even(xf*m); scale = 1/m. amax == 0 gives q = 0 and scale = 0.
// Non-finite rows: any NaN in xf gives scale NaN and q = 0 everywhere; otherwise an infinity gives
// scale +inf and q = +-127 at the infinities, 0 elsewhere (docs/semantics.md).
// `x` is H contiguous bf16/fp16 values; `smooth` is H floats or null.
void dynamic_quant_row(DType dt, const uint16_t* x, const float* smooth, int64_t H, int8_t* q, float* scale);

// combine comm_quant_mode 2 (docs/semantics.md §13): groups of 8 elements, scale = max|f| * (1/127) stored
// rounded to dt, q = int8(rint(fp16_rne(f / unrounded_scale))); a group with a NaN stores scale NaN
// and q = 0, a group with an infinity (no NaN) scale +inf and q = +-127 at the infinities, 0 elsewhere.
// Packed row layout: H int8 values then
// ceil(H/8) scales as dt (2 bytes each).
int64_t comm_quant_row_bytes(int64_t H);
void comm_quant_row(DType dt, const uint16_t* y, int64_t H, void* packed);
// The same for the elements [h_begin, h_end) of the row only (h_begin a multiple of 8, h_end a
// multiple of 8 or H): writes their q bytes and the scales of their groups into the packed row of
// length H. comm_quant_row(dt, y, H, p) is comm_quant_groups(dt, y, H, 0, H, p).
void comm_quant_groups(DType dt, const uint16_t* y, int64_t H, int64_t h_begin, int64_t h_end, void* packed);
// deq[h] = round_to_dt(float(q) * float(stored_scale)), returned as floats.
void comm_dequant_row(DType dt, const void* packed, int64_t H, float* out);

}  // namespace moedist::core
