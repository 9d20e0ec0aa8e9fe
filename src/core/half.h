// bfloat16 / float16 <-> float32 for the library's own code: the public conversions
// (include/moedist/half.h, round to nearest even, written out bit by bit so that every platform and
// later device code produces the same bits) under their core names, plus the raw bit casts.
#pragma once

#include <cstdint>

#include "moedist/half.h"

namespace moedist::core {

using half_detail::bits_float;
using half_detail::float_bits;
using moedist::bf16_to_float;
using moedist::float_to_bf16;
using moedist::float_to_fp16;
using moedist::float_to_half;
using moedist::fp16_to_float;
using moedist::half_to_float;
using moedist::round_to;

}  // namespace moedist::core
