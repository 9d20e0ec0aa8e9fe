#include "layer.h"

#include <cmath>

#include "moedist/elastic.h"
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
  l.active_ranks = o.ranks;
  l.Sr = l.Sr_active = o.shared_ranks;
  l.S = o.shared_ranks > 0 ? 1 : 0;
  l.L = o.experts / (o.ranks - o.shared_ranks);
  l.E_active = l.E;
  for (int64_t g = 0; g < l.E; ++g) {
    l.original_of.push_back(static_cast<int32_t>(g));
    l.compact_of.push_back(static_cast<int32_t>(g));
  }
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

  if (o.elastic > 0) {  // the highest ranks leave, so the remaining ranks keep their ids
    std::vector<int32_t> removed(static_cast<size_t>(l.W), 0);
    for (int64_t r = l.W - o.elastic; r < l.W; ++r) removed[static_cast<size_t>(r)] = 1;
    return with_removed(l, removed);
  }
  return l;
}

Layer with_removed(const Layer& base, const std::vector<int32_t>& removed) {
  Layer l = base;
  l.removed = removed;
  l.elastic_info = make_elastic_info(removed, l.Sr, l.L, 1);
  l.active_ranks = l.elastic_info[1];
  l.Sr_active = l.elastic_info[2];
  l.E_active = l.elastic_info[3];
  l.original_of.clear();
  l.compact_of.assign(static_cast<size_t>(l.E), -1);
  for (int64_t r = l.Sr; r < l.W; ++r) {
    if (removed[static_cast<size_t>(r)]) continue;
    for (int64_t e = 0; e < l.L; ++e) {
      const int64_t g = (r - l.Sr) * l.L + e;
      l.compact_of[static_cast<size_t>(g)] = static_cast<int32_t>(l.original_of.size());
      l.original_of.push_back(static_cast<int32_t>(g));
    }
  }
  return l;
}

std::vector<int64_t> Layer::active_rank_ids() const {
  std::vector<int64_t> ids;
  for (int64_t r = 0; r < W; ++r)
    if (!is_removed(r)) ids.push_back(r);
  return ids;
}

}  // namespace moedist::tools::demo
