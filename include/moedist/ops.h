// dispatch_v2 / combine_v2: the contract of npu_moe_distribute_dispatch_v2 / _combine_v2.
// Parameter names, meanings and defaults follow the Ascend operators; the exact semantics (row order,
// rounding, special experts) are stated in docs/semantics.md.
//
// Notation: W = ep_world_size, Sr = shared_expert_rank_num, S = effective shared expert count (0 when
// Sr == 0), E = moe_expert_num, L = E / (W - Sr) local experts on a MoE rank, K = top-k, BS tokens, H hidden.
#pragma once

#include <cstdint>
#include <string>

#include "moedist/tensor.h"

namespace moedist {

struct DispatchArgs {
  TensorView x;           // [in] (BS, H) bfloat16 or float16; BS may be 0..; strided views accepted
  TensorView expert_ids;  // [in] (BS, K) int32; distinct per row; ids in [0,E) or special [E, E+Z+C+Q)
  std::string group_ep;   // [in] name of a registered EP group (see group.h)
  int64_t ep_world_size = 0;   // [in] W, equals the group's size
  int64_t ep_rank_id = -1;     // [in] this rank in the EP group, in [0, W)
  int64_t moe_expert_num = 0;  // [in] E >= 1, E % (W - Sr) == 0
  // keyword-only in the Python signature:
  TensorView scales;         // [in, optional] (S+E, H) float32 smooth scales; only with quant_mode 2
  TensorView x_active_mask;  // [in, optional] (BS,) bool with trues first, or (BS, K) bool
  TensorView expert_scales;  // [in, optional] (BS, K) float32; fills expand_scales when given
  TensorView elastic_info;   // [in, optional] (4 + 2W,) int32: [is_elastic, W', Sr', E', T1[W], T2[W]]
  std::string group_tp = "";         // [in] name of the TP group (size 2) when tp_world_size == 2
  int64_t tp_world_size = 0;         // [in] 0, 1 (no TP) or 2
  int64_t tp_rank_id = 0;            // [in] 0 or 1
  int64_t expert_shard_type = 0;     // [in] only 0: shared-expert ranks come first
  int64_t shared_expert_num = 1;     // [in] 0..4; forced to 0 when shared_expert_rank_num == 0
  int64_t shared_expert_rank_num = 0;  // [in] Sr in [0, W), Sr % shared_expert_num == 0
  int64_t quant_mode = 0;            // [in] 0: none, 2: dynamic per-token int8
  int64_t global_bs = 0;             // [in] 0 (same BS everywhere) or max_bs * W
  int64_t expert_token_nums_type = 1;  // [in] 0: cumulative, 1: per-expert counts
  std::string comm_alg = "";         // [in] "", "fullmesh", "fullmesh_v1", "fullmesh_v2" (the three: same rows) or "hierarchy"
  int64_t zero_expert_num = 0;       // [in] Z >= 0
  int64_t copy_expert_num = 0;       // [in] C >= 0
  int64_t const_expert_num = 0;      // [in] Q >= 0
  // [in, out, optional] (W,) int64, contiguous: the microseconds this rank waited for each EP rank
  // (indexed by rank in the group as created, also with elastic_info) are added to it; see docs/semantics.md.
  TensorView performance_info;
  // moedist extension: "" (no product limits), "a2" or "a3" (also enforce that product's limits).
  std::string profile = "";
};

struct DispatchResult {
  Tensor expand_x;                 // (max(tp,1)*A, H): x dtype, int8 with quant_mode 2
  Tensor dynamic_scales;           // (max(tp,1)*A,) float32: per-row dequant scale (quant_mode 2)
  Tensor assist_info_for_combine;  // (max(BS*K, 128*A),) int32: (src rank, token, k) per row
  Tensor expert_token_nums;        // (L,) int64 ((1,) on a shared-expert rank)
  Tensor ep_recv_counts;           // (W*max(tp,1)*L,) int32: inclusive prefix counts, expert-major
  Tensor tp_recv_counts;           // (tp_world_size,) int32: rows received by each TP rank
  Tensor expand_scales;            // (A,) float32: expert_scales of each row (1 for shared rows)
};

struct CombineArgs {
  TensorView expand_x;                 // [in] (max(tp,1)*A, H) bfloat16/float16: expert outputs
  TensorView expert_ids;               // [in] (BS, K) int32, as given to dispatch_v2
  TensorView assist_info_for_combine;  // [in] from dispatch_v2
  TensorView ep_send_counts;           // [in] dispatch_v2's ep_recv_counts
  TensorView expert_scales;            // [in] (BS, K) float32 gating weights
  std::string group_ep;
  int64_t ep_world_size = 0;
  int64_t ep_rank_id = -1;
  int64_t moe_expert_num = 0;
  // keyword-only:
  TensorView tp_send_counts;        // [in, optional] dispatch_v2's tp_recv_counts (required with TP)
  TensorView x_active_mask;         // [in, optional] as given to dispatch_v2
  TensorView expand_scales;         // [in, optional] accepted, not needed (weights come from expert_scales)
  TensorView shared_expert_x;       // [in, optional] (BS, H) or (a, b, H) with a*b == BS; only if Sr == 0
  TensorView elastic_info;          // [in, optional] as given to dispatch_v2
  TensorView ori_x;                 // [in, optional] (BS, H): required with copy or const experts
  TensorView const_expert_alpha_1;  // [in, optional] (Q,) expand_x dtype
  TensorView const_expert_alpha_2;  // [in, optional] (Q,) expand_x dtype
  TensorView const_expert_v;        // [in, optional] (Q, H) expand_x dtype
  std::string group_tp = "";
  int64_t tp_world_size = 0;
  int64_t tp_rank_id = 0;
  int64_t expert_shard_type = 0;
  int64_t shared_expert_num = 1;
  int64_t shared_expert_rank_num = 0;
  int64_t global_bs = 0;
  int64_t comm_quant_mode = 0;  // [in] 0 or 2 (int8 with one scale per 8 elements), not with TP
  std::string comm_alg = "";
  int64_t zero_expert_num = 0;
  int64_t copy_expert_num = 0;
  int64_t const_expert_num = 0;
  TensorView performance_info;  // [in, out, optional] as in DispatchArgs
  std::string profile = "";
};

// combine_add_rms_norm: combine_v2, then the residual add and RMSNorm of the combined tokens, in one call
// (npu_moe_distribute_combine_add_rms_norm). Per token t, in float32 (see docs/semantics.md):
//   c = combine_v2's row (rounded to the dtype, as combine_v2 returns it)
//   x = round(c + residual_x)                        -> output x
//   rstd = 1 / sqrt(sum_h(x_h * x_h) / H + norm_eps)  (h ascending, no fused multiply-add) -> output rstd
//   y = round((x * rstd) * gamma)                    -> output y
struct CombineAddRmsNormArgs {
  CombineArgs combine;    // [in] the combine_v2 arguments (the Ascend op names assist_info_for_combine expand_idx)
  TensorView residual_x;  // [in] (BS, 1, H) or (BS, H), expand_x's dtype
  TensorView gamma;       // [in] (H,), expand_x's dtype
  double norm_eps = 1e-6;  // [in] finite, >= 0; used as float32
};

struct CombineAddRmsNormResult {
  Tensor y;     // (BS, 1, H) expand_x's dtype: the normalized tokens times gamma
  Tensor rstd;  // (BS, 1, 1) float32: 1 / RMS of each token of x
  Tensor x;     // (BS, 1, H) expand_x's dtype: combine output + residual_x
};

// Collective over the EP group (and the TP group when tp_world_size == 2): every active rank calls it.
DispatchResult dispatch_v2(const DispatchArgs& args);
// Returns (BS, H) in expand_x's dtype. Rows of inactive tokens are zeros.
Tensor combine_v2(const CombineArgs& args);
// The split-phase pair of each op (npu_moe_distribute_dispatch_setup / _teardown, combine_setup /
// _teardown): *_setup validates, sends this rank's rows and returns a handle; *_teardown waits for the
// peers' rows and returns exactly what dispatch_v2 / combine_v2 return. Between the two the caller may
// compute (e.g. the experts of another micro-batch) while peers finish writing into this rank.
//  - Collective: every rank calls setup and teardown, in the same order. One open setup per EP group at
//    a time (a call on the group before the teardown is an error naming the open one).
//  - The input tensors must stay valid until teardown (combine reads expert_scales, ori_x, ... there).
//  - The exchange is split with comm_alg fullmesh(_v1/_v2) and no TP; otherwise (hierarchy, legacy TP)
//    setup runs the whole op and teardown only hands over the results.
//  - A handle is used once; an unknown or used handle is an InvalidArgument.
uint64_t dispatch_setup(const DispatchArgs& args);
DispatchResult dispatch_teardown(uint64_t handle);
uint64_t combine_setup(const CombineArgs& args);
Tensor combine_teardown(uint64_t handle);

// Collective as combine_v2. Inactive tokens (x_active_mask) combine to zeros: x = residual_x there.
CombineAddRmsNormResult combine_add_rms_norm(const CombineAddRmsNormArgs& args);

// For wrappers that check arguments of their own before calling the ops (the Python package): tells the
// peers of a call this rank will not make that it rejected it, so that they fail at once naming this
// rank and `message` instead of waiting out their deadline. Only the group fields of `args` are read
// (group_ep, ep_world_size, ep_rank_id, elastic_info, group_tp, tp_world_size, tp_rank_id); the peers
// must be in the same operation. Never throws.
void reject_dispatch_v2(const DispatchArgs& args, const std::string& message);
void reject_combine_v2(const CombineArgs& args, const std::string& message);

}  // namespace moedist
