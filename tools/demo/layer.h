// The layer: sizes, roles and the parameters every rank holds (router, const experts). Expert FFN
// weights are not here: each rank makes the ones it hosts from (seed, expert id) (experts.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "options.h"
#include "util.h"

namespace moedist::tools::demo {

struct Layer {
  DemoOptions opt;
  int64_t W = 0, BS = 0, H = 0, K = 0, F = 0, E = 0;
  int tp = 1;                // 1, or 2 with --tp 2
  int64_t active_ranks = 0;  // W minus the ranks removed by --elastic
  int64_t Sr = 0, S = 0;     // shared-expert ranks and shared experts (S is 0 or 1)
  int64_t L = 0;             // experts per MoE rank
  int64_t E_active = 0;      // routed experts in use: E, or E' = L * (active MoE ranks) after scale-down
  int64_t special = 0;       // Z + C + Q
  int64_t active_tokens = 0; // per rank: BS, or BS - BS/4 with --mask
  std::vector<float> router;                      // (H, router_columns()) fp32
  std::vector<uint16_t> alpha1, alpha2, const_v;  // (Q,), (Q,), (Q, H) in the token dtype
  std::vector<int32_t> elastic_info;              // (4 + 2W,) with --elastic, else empty

  DType dtype() const { return opt.dtype; }
  int64_t router_columns() const { return E_active + special; }
  // Router column j picks routed expert j, or a special expert; special ids stay offset by the
  // original E even after scale-down (docs/semantics.md §10).
  int32_t column_expert_id(int64_t j) const { return static_cast<int32_t>(j < E_active ? j : E + (j - E_active)); }
  int64_t calling_ranks() const { return tp * active_ranks; }  // ranks that call the ops
  bool is_shared_rank(int64_t ep_rank) const { return ep_rank < Sr; }
  std::string ep_group(int tp_rank) const { return cat("moedist-demo-ep", tp_rank); }
  std::string tp_group(int64_t ep_rank) const { return cat("moedist-demo-tp", ep_rank); }
};

// The layer of these options: sizes, and the router and const-expert parameters made from the seed.
Layer make_layer(const DemoOptions& o);

}  // namespace moedist::tools::demo
