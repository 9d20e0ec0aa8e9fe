// One rank: the state it owns (inputs, the ops' arguments and results, its output, its times) and the
// layer's phases it runs: gating, dispatch_v2, the experts, combine_v2.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "layer.h"
#include "moedist/ops.h"
#include "moedist/tensor.h"

namespace moedist::tools::demo {

struct PhaseTimes {
  double gating = 0, dispatch = 0, experts = 0, combine = 0;  // ms
};

// Everything one rank owns. Vectors have at least one element so that views of an empty tensor
// (--tokens 0) are still "present" (a null data pointer means an absent optional tensor).
struct RankState {
  int tp_rank = 0;
  int64_t ep_rank = 0;
  std::vector<uint16_t> x;           // (BS, H) in the token dtype
  std::vector<uint8_t> active_mask;  // (BS,) bool, used with --mask
  std::vector<int32_t> expert_ids;   // (BS, K), filled by gating
  std::vector<float> expert_scales;  // (BS, K), filled by gating
  DispatchArgs dispatch_args;
  DispatchResult dispatched;
  std::vector<uint16_t> expert_out;  // (expand_x rows, H): the experts' outputs, combine's expand_x
  CombineArgs combine_args;
  Tensor out;                        // (BS, H): the layer's output
  PhaseTimes times;
};

// Vector sizes: at least one element (see RankState).
inline size_t at_least_one(int64_t n) { return static_cast<size_t>(std::max<int64_t>(n, 1)); }

// A rank's inputs (seeded tokens, mask) and its dispatch_v2 arguments; gating fills in the routing.
// `round` (--rounds): every round has its own tokens; round 0 is the one of a single-round run.
RankState make_rank(const Layer& l, int tp_rank, int64_t ep_rank, int round = 0);

// combine_v2's arguments from the rank's dispatch arguments, dispatch results and expert outputs.
CombineArgs make_combine_args(const Layer& l, const RankState& st);

// The phases of a rank's layer, in order.
enum class Phase { kGating, kDispatch, kExperts, kCombine };

// Runs one rank's layer: makes the hosted experts' weights (not timed), then each phase, timed. The
// runner's `before_phase` is called before each phase: the thread and process runners line the ranks up
// there (so that a phase's time does not include waiting for a slower peer); it is also the place where
// a runner can act on a rank at a given phase (e.g. stop it, to exercise failure handling).
void run_rank(const Layer& l, RankState& st, const std::function<void(Phase)>& before_phase);

// "rank 3", or "rank 3 (tp 1)" with TP.
std::string rank_name(const Layer& l, int tp_rank, int64_t ep_rank);
std::string rank_name(const Layer& l, const RankState& st);

}  // namespace moedist::tools::demo
