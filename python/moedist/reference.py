"""The golden model from Python: every rank's call of one step in, every rank's outputs out.

    outs = moedist.reference_dispatch_v2([kwargs_rank0, kwargs_rank1, ...])
    ys = moedist.reference_combine_v2([kwargs_rank0, kwargs_rank1, ...])

Each kwargs dict holds the keyword arguments of moedist.npu_moe_distribute_dispatch_v2 /
npu_moe_distribute_combine_v2 for one calling rank (removed elastic ranks do not call; with
tp_world_size 2, both TP groups' calls together). Group names are not used and may be left out.
Results come back in the order of the calls: 7-tuples for dispatch, (BS, H) tensors for combine. The
reference fills rows past the received count with zeros (the distributed ops leave them unspecified).
"""
from __future__ import annotations

import inspect
from typing import List, Sequence, Tuple

import torch

from . import _C
from ._convert import from_capsule
from ._convert import view
from ._ops import (_check_reserved, _combine_kwargs, _dispatch_kwargs, npu_moe_distribute_combine_add_rms_norm,
                   npu_moe_distribute_combine_v2, npu_moe_distribute_dispatch_v2)

_DISPATCH_SIG = inspect.signature(npu_moe_distribute_dispatch_v2)
_COMBINE_SIG = inspect.signature(npu_moe_distribute_combine_v2)
_ADD_RMS_NORM_SIG = inspect.signature(npu_moe_distribute_combine_add_rms_norm)


def _bind(sig, kwargs: dict, op: str, i: int) -> dict:
    kw = dict(kwargs)
    kw.setdefault("group_ep", "reference_ep")
    if kw.get("tp_world_size", 0) == 2:
        kw.setdefault("group_tp", "reference_tp")
    try:
        bound = sig.bind(**kw)
    except TypeError as e:
        raise ValueError(f"{op} reference: call {i}: {e}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def reference_dispatch_v2(calls: Sequence[dict], *, ranks_per_server: int = 0) -> List[Tuple[torch.Tensor, ...]]:
    """Reference dispatch for all calling ranks of one step (see the module docstring)."""
    args = [_dispatch_kwargs(**_bind(_DISPATCH_SIG, c, "npu_moe_distribute_dispatch_v2", i)) for i, c in enumerate(calls)]
    out = _C.reference_dispatch_v2(args, ranks_per_server)
    return [tuple(from_capsule(c) for c in r) for r in out]


def reference_combine_v2(calls: Sequence[dict], *, ranks_per_server: int = 0) -> List[torch.Tensor]:
    """Reference combine for all calling ranks of one step (see the module docstring)."""
    args = [_combine_kwargs(**_bind(_COMBINE_SIG, c, "npu_moe_distribute_combine_v2", i)) for i, c in enumerate(calls)]
    return [from_capsule(c) for c in _C.reference_combine_v2(args, ranks_per_server)]


def reference_combine_add_rms_norm(calls: Sequence[dict], *, ranks_per_server: int = 0
                                   ) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Reference combine + add + RMSNorm for all calling ranks of one step: the kwargs of
    moedist.npu_moe_distribute_combine_add_rms_norm per rank in, (y, rstd, x) per rank out."""
    op = "npu_moe_distribute_combine_add_rms_norm"
    args = []
    for i, c in enumerate(calls):
        b = _bind(_ADD_RMS_NORM_SIG, c, op, i)
        _check_reserved(b.pop("activation_scale"), b.pop("weight_scale"), b.pop("group_list"), b.pop("out_dtype"),
                        b.pop("group_list_type"))
        residual_x, gamma, eps = b.pop("residual_x"), b.pop("gamma"), float(b.pop("norm_eps"))
        b["assist_info_for_combine"] = b.pop("expand_idx")
        b["comm_alg"] = ""
        args.append((_combine_kwargs(**b), view(residual_x, "residual_x", op), view(gamma, "gamma", op), eps))
    return [tuple(from_capsule(t) for t in r) for r in _C.reference_combine_add_rms_norm(args, ranks_per_server)]
