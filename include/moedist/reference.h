// The golden model: every rank's call of one step in one process, every rank's outputs back, computed
// with plain loops in the order and rounding the spec fixes (docs/semantics.md). It is slow on purpose
// and serves as the yardstick for the fast paths and for accelerator results.
#pragma once

#include <vector>

#include "moedist/ops.h"

namespace moedist::reference {

// `calls` holds the arguments of every rank that calls the op in this step (removed elastic ranks do
// not call): for tp_world_size 2, both TP groups (tp_rank_id 0 and 1) together. Group names are not
// used; ranks are identified by (tp_rank_id, ep_rank_id). Results come back in the order of `calls`.
// comm_alg "hierarchy" follows its own documented order of summation in combine.
// comm_alg "hierarchy": consecutive groups of `ranks_per_server` ranks form a server (0: one server).
// Per source token, combine sums per server (rows in slot order k = 0..K+S-1, each y * expand_scales),
// rounds each server's partial to the token dtype, then adds the partials in server order, then the
// copy/const experts in k order, then shared_expert_x.
struct Options {
  int ranks_per_server = 0;
};
std::vector<DispatchResult> dispatch_v2(const std::vector<DispatchArgs>& calls, const Options& options = {});
std::vector<Tensor> combine_v2(const std::vector<CombineArgs>& calls, const Options& options = {});
// combine_v2's reference, then the add and RMSNorm of each calling rank as plain loops (order in ops.h).
std::vector<CombineAddRmsNormResult> combine_add_rms_norm(const std::vector<CombineAddRmsNormArgs>& calls,
                                                         const Options& options = {});

}  // namespace moedist::reference
