// The experts: SwiGLU FFN y = W2 (silu(W1 x) * (W3 x)) in fp32, their seeded weights, which experts a
// rank hosts, and running them on the rows dispatch_v2 delivered.
#pragma once

#include <cstdint>
#include <vector>

#include "layer.h"
#include "moedist/ops.h"

namespace moedist::tools::demo {

struct RankState;

struct ExpertKey {
  bool shared = false;
  int64_t id = 0;  // global routed expert id, or shared expert index
};

struct ExpertWeights {
  int64_t H = 0, F = 0;
  std::vector<float> w1, w3;  // (H, F): stored input-major so the inner loops run over F contiguously
  std::vector<float> w2;      // (F, H)
};

ExpertWeights make_expert_weights(const Layer& l, ExpertKey key);

struct FfnScratch {
  std::vector<float> gate, up;
};

// y = W2[f0:f1, :]^T (silu(x W1[:, f0:f1]) * (x W3[:, f0:f1])). With TP each rank of the pair takes
// half of the intermediate dims, so y is its partial sum (row-parallel W2) and combine adds the two.
void ffn_forward(const ExpertWeights& w, const float* x, int64_t f0, int64_t f1, FfnScratch& s, float* y);

// The experts a rank hosts (docs/semantics.md §1): shared ranks come first, then L routed experts per rank.
std::vector<ExpertKey> hosted_experts(const Layer& l, int64_t ep_rank);

// Per-token dynamic int8 quantization as dispatch_v2 does it (docs/semantics.md §5, no smooth scales), then
// dequantized: the values the experts see with --quant 2.
void quantize_dequantize(std::vector<float>& row);

// Row `row` of dispatch's expand_x in fp32: int8 * per-row scale with quant_mode 2.
void expand_row(const Layer& l, const DispatchResult& d, int64_t row, float* out);

// Runs the hosted experts on the received rows. With expert_token_nums_type 1 the rows come grouped
// by local expert: the first expert_token_nums[0] rows are local expert 0's, and so on. With TP they
// include the peer's rows, which this rank also computes its half for.
void run_experts(const Layer& l, RankState& st, const std::vector<ExpertWeights>& weights);

}  // namespace moedist::tools::demo
