"""Output shapes of dispatch_v2 from the integer arguments and the input shapes only.

These are the shapes the C++ core allocates (src/core/config.cc: EpConfig::A, ep_counts_len,
expert_nums_len; src/ops/dispatch.cc), so graph tracing (the ops' fake implementations) never needs
tensor values:

- W = ep_world_size, Sr = shared_expert_rank_num, E = moe_expert_num, L = E / (W - Sr) local experts,
  BS, K from expert_ids, H from x, tp = max(tp_world_size, 1) (2 only when tp_world_size == 2).
- global_bs_real = global_bs or BS * W; max_bs = global_bs_real / W.
- A_moe = global_bs_real * min(L, K); A_shared = max_bs * ceil(W / R) with R = Sr / shared_expert_num
  (0 when Sr == 0). A = A_shared on a shared-expert rank (ep_rank_id < Sr), A_moe on a MoE rank, and
  max(A_shared, A_moe) on every rank whenever elastic_info is passed (roles may change).
- expand_x (tp*A, H): int8 with quant_mode 2, else x's dtype; dynamic_scales (tp*A,) float32;
  assist_info_for_combine (max(BS*K, 128*A),) int32; expert_token_nums (n,) int64 and
  ep_recv_counts (W*tp*n,) int32 with n = 1 on a shared-expert rank and L otherwise (L on every rank
  with elastic_info); tp_recv_counts (tp_world_size,) int32; expand_scales (A,) float32.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class DispatchShapes(NamedTuple):
    expand_x: tuple
    dynamic_scales: tuple
    assist_info_for_combine: tuple
    expert_token_nums: tuple
    ep_recv_counts: tuple
    tp_recv_counts: tuple
    expand_scales: tuple


DISPATCH_DTYPES = (None, torch.float32, torch.int32, torch.int64, torch.int32, torch.int32, torch.float32)


def _max(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return torch.sym_max(a, b)


def _min(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.sym_min(a, b)


def dispatch_shapes(x_shape: Sequence, expert_ids_shape: Sequence, ep_world_size: int, ep_rank_id: int,
                    moe_expert_num: int, *, has_elastic_info: bool = False, tp_world_size: int = 0,
                    shared_expert_num: int = 1, shared_expert_rank_num: int = 0, global_bs: int = 0) -> DispatchShapes:
    """The 7 output shapes of npu_moe_distribute_dispatch_v2 (see the module docstring)."""
    W, Sr, E = ep_world_size, shared_expert_rank_num, moe_expert_num
    if W < 1 or not 0 <= Sr < W:
        raise ValueError(f"npu_moe_distribute_dispatch_v2: ep_world_size={W}, shared_expert_rank_num={Sr} "
                         f"(must be ep_world_size >= 1 and shared_expert_rank_num in [0, ep_world_size))")
    if Sr > 0 and shared_expert_num < 1:
        raise ValueError(f"npu_moe_distribute_dispatch_v2: shared_expert_num={shared_expert_num} with "
                         f"shared_expert_rank_num={Sr} (must be >= 1 when there are shared-expert ranks)")
    H = x_shape[1]
    BS, K = expert_ids_shape[0], expert_ids_shape[1]
    L = E // (W - Sr)
    tp = 2 if tp_world_size == 2 else 1
    gbs = global_bs if global_bs else BS * W
    max_bs = gbs // W
    a_moe = gbs * _min(L, K)
    if Sr > 0:
        R = Sr // shared_expert_num
        a_shared = max_bs * (-(-W // R)) if R > 0 else 0
    else:
        a_shared = 0
    shared_rank = ep_rank_id < Sr
    if has_elastic_info:
        A = _max(a_shared, a_moe)
        n = L
    else:
        A = a_shared if shared_rank else a_moe
        n = 1 if shared_rank else L
    return DispatchShapes(
        expand_x=(tp * A, H),
        dynamic_scales=(tp * A,),
        assist_info_for_combine=(_max(BS * K, 128 * A),),
        expert_token_nums=(n,),
        ep_recv_counts=(W * tp * n,),
        tp_recv_counts=(tp_world_size,),
        expand_scales=(A,),
    )


def combine_shape(expand_x_shape: Sequence, expert_ids_shape: Sequence) -> tuple:
    """npu_moe_distribute_combine_v2 returns (BS, H) in expand_x's dtype."""
    return (expert_ids_shape[0], expand_x_shape[1])
