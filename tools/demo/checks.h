// The checks: the layer computed densely in fp32 in one process, and bit-for-bit comparisons of a rank's
// dispatch_v2 and combine_v2 outputs with moedist::reference.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "layer.h"
#include "rank.h"

namespace moedist::tools::demo {

struct RankSummary;

// The layer computed densely in fp32 in one process: for every active token,
//   sum_k w_k * expert_{id_k}(x)  (+ the shared expert's FFN(x), unweighted),
// with zero -> 0, copy -> x, const -> alpha1*x + alpha2*v. After a scale-down (l.removed) the experts
// of the removed ranks are not there (the router no longer picks them), a compact id is the original
// expert it stands for (l.original_of), and the shared expert is gone once no shared-expert rank is left. Inputs of the FFN experts are quantized
// and dequantized exactly like dispatch_v2 does with --quant 2, so the check measures the layer's
// rounding (expert outputs and the combined sum in the token dtype), not the int8 error.
// Only the ranks in `which` are computed (a rank process checks its own tokens); the others' entries
// stay empty.
std::vector<std::vector<float>> dense_layer(const Layer& l, const std::vector<RankState>& ranks, const std::vector<size_t>& which);

struct Accuracy {
  double max_abs_err = 0;
  double max_abs_dense = 0;
  int64_t non_finite = 0;
  double rel_err() const { return max_abs_dense > 0 ? max_abs_err / max_abs_dense : max_abs_err; }
  void merge(const Accuracy& a) {
    max_abs_err = std::max(max_abs_err, a.max_abs_err);
    max_abs_dense = std::max(max_abs_dense, a.max_abs_dense);
    non_finite += a.non_finite;
  }
};

// max |out - dense| over a rank's output, and the non-finite values in it.
Accuracy compare_with_dense(const Layer& l, const RankState& st, const std::vector<float>& dense);

// "" if the rank's dispatch outputs match the reference's bit for bit.
std::string compare_dispatch(const Layer& l, const RankState& st, const DispatchResult& w);
// "" if the rank's combine_v2 output matches the reference's bit for bit.
std::string compare_combine(const Layer& l, const RankState& st, const Tensor& want);

// Rows this rank received on its own EP group (without its TP peer's).
int64_t own_rows(const Layer& l, const RankState& st, const DispatchResult& d);

// The checks of rank `me` in a rank process: every other rank's arguments are rebuilt from the seed
// (inputs, gating, and expert outputs computed from the reference's dispatch rows, which is what the
// rank itself computes when its dispatch is bit-exact), so the reference can run all ranks' calls.
void check_own_rank(const Layer& l, std::vector<RankState>& ranks, size_t me, RankSummary& s);

}  // namespace moedist::tools::demo
