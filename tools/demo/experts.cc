#include "experts.h"

#include <algorithm>
#include <cmath>

#include "moedist/error.h"
#include "moedist/half.h"
#include "rank.h"
#include "rng.h"

namespace moedist::tools::demo {

ExpertWeights make_expert_weights(const Layer& l, ExpertKey key) {
  ExpertWeights w;
  w.H = l.H;
  w.F = l.F;
  Rng rng(l.opt.seed, key.shared ? Stream::kSharedExpert : Stream::kRoutedExpert, static_cast<uint64_t>(key.id));
  // Scales keep the intermediate activations O(1) and the output comparable to the input.
  const float in_scale = 2.0f * std::sqrt(3.0f / static_cast<float>(l.H));
  const float out_scale = std::sqrt(3.0f / static_cast<float>(l.F));
  const size_t n = static_cast<size_t>(l.H * l.F);
  w.w1.resize(n);
  w.w3.resize(n);
  w.w2.resize(n);
  for (float& v : w.w1) v = rng.uniform() * in_scale;
  for (float& v : w.w3) v = rng.uniform() * in_scale;
  for (float& v : w.w2) v = rng.uniform() * out_scale;
  return w;
}

void ffn_forward(const ExpertWeights& w, const float* x, int64_t f0, int64_t f1, FfnScratch& s, float* y) {
  const int64_t n = f1 - f0, H = w.H, F = w.F;
  s.gate.assign(static_cast<size_t>(n), 0.f);
  s.up.assign(static_cast<size_t>(n), 0.f);
  float* g = s.gate.data();
  float* u = s.up.data();
  for (int64_t h = 0; h < H; ++h) {
    const float xh = x[h];
    const float* r1 = w.w1.data() + h * F + f0;
    const float* r3 = w.w3.data() + h * F + f0;
    for (int64_t f = 0; f < n; ++f) {
      g[f] += xh * r1[f];
      u[f] += xh * r3[f];
    }
  }
  for (int64_t f = 0; f < n; ++f) g[f] = g[f] / (1.0f + std::exp(-g[f])) * u[f];
  std::fill(y, y + H, 0.f);
  for (int64_t f = 0; f < n; ++f) {
    const float a = g[f];
    const float* r2 = w.w2.data() + (f0 + f) * H;
    for (int64_t h = 0; h < H; ++h) y[h] += a * r2[h];
  }
}

std::vector<ExpertKey> hosted_experts(const Layer& l, int64_t ep_rank) {
  if (l.is_shared_rank(ep_rank)) return {ExpertKey{true, ep_rank / (l.Sr / l.S)}};
  std::vector<ExpertKey> keys;
  for (int64_t e = 0; e < l.L; ++e) keys.push_back(ExpertKey{false, (ep_rank - l.Sr) * l.L + e});
  return keys;
}

void quantize_dequantize(std::vector<float>& row) {
  float amax = 0.f;
  for (float v : row) amax = std::max(amax, std::fabs(v));
  if (amax == 0.f) return;  // all zeros stay zeros
  const float m = 127.0f / amax;
  const float scale = 1.0f / m;
  for (float& v : row) v = std::clamp(std::nearbyint(v * m), -128.0f, 127.0f) * scale;
}

void expand_row(const Layer& l, const DispatchResult& d, int64_t row, float* out) {
  const int64_t H = l.H;
  if (l.opt.quant == 2) {
    const int8_t* q = static_cast<const int8_t*>(d.expand_x.data()) + row * H;
    const float scale = d.dynamic_scales.data_as<float>()[row];
    for (int64_t h = 0; h < H; ++h) out[h] = static_cast<float>(q[h]) * scale;
  } else {
    const uint16_t* x = d.expand_x.data_as<uint16_t>() + row * H;
    for (int64_t h = 0; h < H; ++h) out[h] = half_to_float(l.dtype(), x[h]);
  }
}

void run_experts(const Layer& l, RankState& st, const std::vector<ExpertWeights>& weights) {
  const DispatchResult& d = st.dispatched;
  const int64_t H = l.H, rows = d.expand_x.size(0);
  st.expert_out.assign(at_least_one(rows * H), 0);
  const int64_t f0 = l.tp == 2 ? st.tp_rank * (l.F / 2) : 0;
  const int64_t f1 = l.tp == 2 ? f0 + l.F / 2 : l.F;
  const bool shared = l.is_shared_rank(st.ep_rank);
  std::vector<float> x(static_cast<size_t>(H)), y(static_cast<size_t>(H));
  FfnScratch scratch;
  int64_t row = 0;
  for (int64_t e = 0; e < d.expert_token_nums.numel(); ++e) {
    const int64_t count = d.expert_token_nums.data_as<int64_t>()[e];
    if (count == 0) continue;
    if (!shared && e >= static_cast<int64_t>(weights.size()))
      throw Error(cat("rank ", st.ep_rank, ": expert_token_nums has rows for local expert ", e, " but the rank hosts ", weights.size()));
    if (row + count > rows)
      throw Error(cat("rank ", st.ep_rank, ": expert_token_nums counts ", row + count, " rows but expand_x has only ", rows));
    // A shared-expert rank hosts one expert: all its rows are that expert's.
    const ExpertWeights& w = weights[shared ? 0 : static_cast<size_t>(e)];
    for (int64_t i = 0; i < count; ++i, ++row) {
      expand_row(l, d, row, x.data());
      ffn_forward(w, x.data(), f0, f1, scratch, y.data());
      uint16_t* out = st.expert_out.data() + row * H;
      for (int64_t h = 0; h < H; ++h) out[h] = float_to_half(l.dtype(), y[static_cast<size_t>(h)]);
    }
  }
}

}  // namespace moedist::tools::demo
