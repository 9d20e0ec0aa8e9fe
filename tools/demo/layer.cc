#include "layer.h"

#include <cmath>

#include "moedist/half.h"
#include "rng.h"

namespace moedist::tools::demo {

Layer make_layer(const DemoOptions& o) {
  Layer l;
  l.opt = o;
  l.W = o.ranks;
  l.BS = o.tokens;
  l.H = o.hidden;
  l.K = o.topk;
  l.F = o.ffn;
  l.E = o.experts;
  l.tp = o.tp == 2 ? 2 : 1;
  l.active_ranks = o.ranks - o.elastic;
  l.Sr = o.shared_ranks;
  l.S = o.shared_ranks > 0 ? 1 : 0;
  l.L = o.experts / (o.ranks - o.shared_ranks);
  l.E_active = l.L * (l.active_ranks - l.Sr);
  l.special = o.zero + o.copy + o.constant;
  l.active_tokens = o.mask ? l.BS - l.BS / 4 : l.BS;

  // Router weights scaled so that logits have a standard deviation near 1: a visibly uneven but not
  // degenerate expert load.
  const int64_t cols = l.router_columns();
  const float router_scale = 2.0f / std::sqrt(static_cast<float>(l.H));
  Rng rng(o.seed, Stream::kRouter, 0);
  l.router.resize(static_cast<size_t>(l.H * cols));
  for (float& w : l.router) w = rng.uniform() * router_scale;

  Rng crng(o.seed, Stream::kConstExperts, 0);
  for (int c = 0; c < o.constant; ++c) {
    l.alpha1.push_back(float_to_half(o.dtype, crng.uniform()));
    l.alpha2.push_back(float_to_half(o.dtype, crng.uniform()));
  }
  for (int64_t i = 0; i < o.constant * l.H; ++i) l.const_v.push_back(float_to_half(o.dtype, crng.uniform()));

  if (o.elastic > 0) {
    // The highest ranks leave, so the remaining ranks keep their ids: local id == physical id.
    l.elastic_info.assign(static_cast<size_t>(4 + 2 * l.W), -1);
    l.elastic_info[0] = 1;
    l.elastic_info[1] = static_cast<int32_t>(l.active_ranks);
    l.elastic_info[2] = static_cast<int32_t>(l.Sr);
    l.elastic_info[3] = static_cast<int32_t>(l.E_active);
    for (int64_t r = 0; r < l.active_ranks; ++r) {
      l.elastic_info[static_cast<size_t>(4 + r)] = static_cast<int32_t>(r);           // T1: physical -> local
      l.elastic_info[static_cast<size_t>(4 + l.W + r)] = static_cast<int32_t>(r);     // T2: local -> physical
    }
  }
  return l;
}

}  // namespace moedist::tools::demo
