#include "rank.h"

#include "experts.h"
#include "moedist/half.h"
#include "rng.h"
#include "router.h"
#include "util.h"

namespace moedist::tools::demo {

RankState make_rank(const Layer& l, int tp_rank, int64_t ep_rank, int round) {
  RankState st;
  st.tp_rank = tp_rank;
  st.ep_rank = ep_rank;
  const DType dt = l.dtype();
  // The two EP groups of a TP pair hold different tokens, as on the device.
  Rng rng(l.opt.seed, Stream::kTokens, (static_cast<uint64_t>(round) << 32) + static_cast<uint64_t>(tp_rank * l.W + ep_rank));
  st.x.assign(at_least_one(l.BS * l.H), 0);
  for (int64_t i = 0; i < l.BS * l.H; ++i) st.x[static_cast<size_t>(i)] = float_to_half(dt, rng.uniform());
  st.active_mask.assign(at_least_one(l.BS), 0);
  for (int64_t t = 0; t < l.active_tokens; ++t) st.active_mask[static_cast<size_t>(t)] = 1;
  st.expert_ids.assign(at_least_one(l.BS * l.K), 0);
  st.expert_scales.assign(at_least_one(l.BS * l.K), 0.f);

  DispatchArgs& a = st.dispatch_args;
  a.x = TensorView(st.x.data(), dt, {l.BS, l.H});
  a.expert_ids = TensorView(st.expert_ids.data(), DType::kInt32, {l.BS, l.K});
  a.group_ep = l.ep_group(tp_rank);
  a.ep_world_size = l.W;
  a.ep_rank_id = ep_rank;
  a.moe_expert_num = l.E;
  if (l.opt.mask) a.x_active_mask = TensorView(st.active_mask.data(), DType::kBool, {l.BS});
  a.expert_scales = TensorView(st.expert_scales.data(), DType::kFloat32, {l.BS, l.K});
  if (!l.elastic_info.empty()) a.elastic_info = TensorView(l.elastic_info.data(), DType::kInt32, {4 + 2 * l.W});
  if (l.tp == 2) {
    a.group_tp = l.tp_group(ep_rank);
    a.tp_world_size = 2;
    a.tp_rank_id = tp_rank;
  }
  a.shared_expert_num = 1;
  a.shared_expert_rank_num = l.Sr;
  a.quant_mode = l.opt.quant;
  a.expert_token_nums_type = 1;  // per-expert counts: run_experts walks them
  a.zero_expert_num = l.opt.zero;
  a.copy_expert_num = l.opt.copy;
  a.const_expert_num = l.opt.constant;
  return st;
}

CombineArgs make_combine_args(const Layer& l, const RankState& st) {
  const DispatchArgs& da = st.dispatch_args;
  const DispatchResult& d = st.dispatched;
  CombineArgs a;
  a.expand_x = TensorView(st.expert_out.data(), l.dtype(), {d.expand_x.size(0), l.H});
  a.expert_ids = da.expert_ids;
  a.assist_info_for_combine = d.assist_info_for_combine;
  a.ep_send_counts = d.ep_recv_counts;
  a.expert_scales = da.expert_scales;
  a.group_ep = da.group_ep;
  a.ep_world_size = da.ep_world_size;
  a.ep_rank_id = da.ep_rank_id;
  a.moe_expert_num = da.moe_expert_num;
  if (l.tp == 2) a.tp_send_counts = d.tp_recv_counts;
  a.x_active_mask = da.x_active_mask;
  a.elastic_info = da.elastic_info;
  if (l.opt.copy > 0 || l.opt.constant > 0) a.ori_x = da.x;
  if (l.opt.constant > 0) {
    const int64_t Q = l.opt.constant;
    a.const_expert_alpha_1 = TensorView(l.alpha1.data(), l.dtype(), {Q});
    a.const_expert_alpha_2 = TensorView(l.alpha2.data(), l.dtype(), {Q});
    a.const_expert_v = TensorView(l.const_v.data(), l.dtype(), {Q, l.H});
  }
  a.group_tp = da.group_tp;
  a.tp_world_size = da.tp_world_size;
  a.tp_rank_id = da.tp_rank_id;
  a.shared_expert_num = da.shared_expert_num;
  a.shared_expert_rank_num = da.shared_expert_rank_num;
  a.comm_quant_mode = l.opt.comm_quant;
  a.zero_expert_num = da.zero_expert_num;
  a.copy_expert_num = da.copy_expert_num;
  a.const_expert_num = da.const_expert_num;
  return a;
}

void run_rank(const Layer& l, RankState& st, const std::function<void(Phase)>& before_phase) {
  std::vector<ExpertWeights> weights;
  for (const ExpertKey& key : hosted_experts(l, st.ep_rank)) weights.push_back(make_expert_weights(l, key));

  before_phase(Phase::kGating);
  Clock::time_point start = Clock::now();
  gate(l, st);
  st.times.gating = ms_since(start);

  before_phase(Phase::kDispatch);
  start = Clock::now();
  st.dispatched = dispatch_v2(st.dispatch_args);
  st.times.dispatch = ms_since(start);

  before_phase(Phase::kExperts);
  start = Clock::now();
  run_experts(l, st, weights);
  st.times.experts = ms_since(start);

  st.combine_args = make_combine_args(l, st);
  before_phase(Phase::kCombine);
  start = Clock::now();
  st.out = combine_v2(st.combine_args);
  st.times.combine = ms_since(start);
}

std::string rank_name(const Layer& l, int tp_rank, int64_t ep_rank) {
  return l.tp == 2 ? cat("rank ", ep_rank, " (tp ", tp_rank, ")") : cat("rank ", ep_rank);
}
std::string rank_name(const Layer& l, const RankState& st) { return rank_name(l, st.tp_rank, st.ep_rank); }

}  // namespace moedist::tools::demo
