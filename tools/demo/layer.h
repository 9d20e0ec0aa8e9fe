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
  int64_t active_ranks = 0;  // W minus the ranks removed (--elastic) or failed (--kill, --stop)
  int64_t Sr = 0, S = 0;     // shared-expert ranks and shared experts (S is 0 or 1), as the group was made
  int64_t Sr_active = 0;     // shared-expert ranks left: Sr minus the removed ones (0: no shared expert any more)
  int64_t L = 0;             // experts per MoE rank
  int64_t E_active = 0;      // routed experts in use: E, or E' = L * (active MoE ranks) after scale-down
  // One entry per original rank, 1 where the rank is removed (--elastic: the highest ones; --kill, --stop:
  // the ones the survivors agreed failed). Empty when none is.
  std::vector<int32_t> removed;
  std::vector<int32_t> original_of;  // (E_active,): compact routed id -> original expert id (weights are keyed by it)
  std::vector<int32_t> compact_of;   // (E,): original expert id -> compact id, -1 for an expert of a removed rank
  int64_t special = 0;       // Z + C + Q
  int64_t active_tokens = 0; // per rank: BS, or BS - BS/4 with --mask
  std::vector<float> router;                      // (H, router_columns()) fp32
  std::vector<uint16_t> alpha1, alpha2, const_v;  // (Q,), (Q,), (Q, H) in the token dtype
  std::vector<int32_t> elastic_info;              // (4 + 2W,) with --elastic, else empty

  DType dtype() const { return opt.dtype; }
  // The router has a column per expert of the whole layer: column j < E picks original routed expert j
  // (never one of a removed rank: it passes its compact id, compact_of[j]), column j >= E the special
  // expert with id j: special ids stay offset by the original E even after scale-down (docs/semantics.md §10).
  int64_t router_columns() const { return E + special; }
  bool is_removed(int64_t ep_rank) const { return !removed.empty() && removed[static_cast<size_t>(ep_rank)] != 0; }
  // The original ranks that call the ops, ascending (their compact order).
  std::vector<int64_t> active_rank_ids() const;
  int64_t calling_ranks() const { return tp * active_ranks; }  // ranks that call the ops
  bool is_shared_rank(int64_t ep_rank) const { return ep_rank < Sr; }
  std::string ep_group(int tp_rank) const { return cat("moedist-demo-ep", tp_rank); }
  std::string tp_group(int64_t ep_rank) const { return cat("moedist-demo-tp", ep_rank); }
};

// The layer of these options: sizes, and the router and const-expert parameters made from the seed.
Layer make_layer(const DemoOptions& o);

// The same layer after a scale-down that removes the ranks marked in `removed` (one entry per original
// rank, non-zero: removed): elastic_info from moedist::make_elastic_info, the compact expert ids from
// the ranks' order. The lost experts are not routed to any more; weights and router stay the same.
Layer with_removed(const Layer& base, const std::vector<int32_t>& removed);

}  // namespace moedist::tools::demo
