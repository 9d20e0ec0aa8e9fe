#include "router.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "moedist/half.h"
#include "rank.h"

namespace moedist::tools::demo {

void gate(const Layer& l, RankState& st) {
  const int64_t H = l.H, K = l.K, n = l.router_columns();
  std::vector<float> x(static_cast<size_t>(H)), prob(static_cast<size_t>(n));
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t t = 0; t < l.BS; ++t) {
    for (int64_t h = 0; h < H; ++h) x[static_cast<size_t>(h)] = half_to_float(l.dtype(), st.x[static_cast<size_t>(t * H + h)]);
    std::fill(prob.begin(), prob.end(), 0.f);
    for (int64_t h = 0; h < H; ++h) {
      const float xh = x[static_cast<size_t>(h)];
      const float* wg = l.router.data() + h * n;
      for (int64_t j = 0; j < n; ++j) prob[static_cast<size_t>(j)] += xh * wg[j];
    }
    // Experts of removed ranks are not candidates: their columns drop out of the softmax.
    float max_logit = -INFINITY;
    for (int64_t j = 0; j < n; ++j)
      if (j >= l.E || l.compact_of[static_cast<size_t>(j)] >= 0) max_logit = std::max(max_logit, prob[static_cast<size_t>(j)]);
    for (int64_t j = 0; j < l.E; ++j)
      if (l.compact_of[static_cast<size_t>(j)] < 0) prob[static_cast<size_t>(j)] = -INFINITY;
    float sum = 0.f;
    for (float& p : prob) sum += (p = std::exp(p - max_logit));
    for (float& p : prob) p /= sum;
    for (int64_t j = 0; j < l.E; ++j)  // below every candidate, also one whose probability underflowed
      if (l.compact_of[static_cast<size_t>(j)] < 0) prob[static_cast<size_t>(j)] = -1.f;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int64_t a, int64_t b) {
      const float pa = prob[static_cast<size_t>(a)], pb = prob[static_cast<size_t>(b)];
      return pa > pb || (pa == pb && a < b);
    });
    float chosen = 0.f;
    for (int64_t k = 0; k < K; ++k) chosen += prob[static_cast<size_t>(order[static_cast<size_t>(k)])];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j = order[static_cast<size_t>(k)];
      st.expert_ids[static_cast<size_t>(t * K + k)] = j < l.E ? l.compact_of[static_cast<size_t>(j)] : static_cast<int32_t>(j);
      st.expert_scales[static_cast<size_t>(t * K + k)] = prob[static_cast<size_t>(j)] / chosen;
    }
  }
}

}  // namespace moedist::tools::demo
