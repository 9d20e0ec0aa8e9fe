"""Failover: the surviving ranks of an expert-parallel group go on after a rank died or stalled.

After a call raised moedist.TransportError or moedist.Timeout because a peer died or stopped, every
surviving rank calls ``recover``; the survivors agree on one set of failed ranks (the same on each,
also when another rank dies meanwhile) and what the failed call left behind is never read again. The
calls then continue on the same group among the survivors, with the ``elastic_info`` that
``make_elastic_info`` builds from the agreed mask, and the router's expert ids moved to the compact
layout by ``remap_expert_ids``::

    try:
        out = layer(x)
    except moedist.TransportError:          # moedist.Timeout is one too
        rec = moedist.recover(ep_name, rank)
        elastic_info = moedist.make_elastic_info(rec.failed, shared_expert_rank_num, local_expert_num)
        ...                                 # route to surviving experts, call again with elastic_info

Shared-memory and thread groups survive a death; groups across hosts (MPI) do not (docs/design.md).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch

from . import _C

__all__ = ["Recovery", "recover", "query_active_mask", "make_elastic_info", "remap_expert_ids"]


class Recovery(NamedTuple):
    """What the surviving ranks agreed on.

    failed: int32 tensor (W,), 1 for every rank declared failed so far (the set only grows).
    generation: agreements the group has run. calls_completed: dispatch / combine calls every survivor
    completed on this group since it was made; a rank may have completed one more (the dying rank
    finished writing to it and not to another): calls past this number are to be made again.
    newly_failed: ranks this agreement added.
    """
    failed: torch.Tensor
    generation: int
    calls_completed: int
    newly_failed: List[int]


def _name_and_rank(group, rank: Optional[int]):
    if isinstance(group, str):
        if rank is None:
            raise ValueError(f"moedist: rank is required with the group name {group!r} (the rank id the ops are called with)")
        return group, int(rank)
    # A torch.distributed ProcessGroup: the name moedist.get_comm_name gave it; the rank within the group.
    from .distributed import _comms
    import torch.distributed as dist

    hit = _comms.get(id(group))
    if hit is None or hit[0] is not group:
        raise ValueError("moedist: this process group has no moedist communicator (call moedist.get_comm_name(group) first)")
    return hit[1], int(dist.get_rank(group)) if rank is None else int(rank)


def _mask_list(failed: Union[torch.Tensor, Sequence[int]]) -> List[int]:
    if isinstance(failed, torch.Tensor):
        if failed.dim() != 1:
            raise ValueError(f"moedist: failed must be 1-D (one entry per rank), got shape {tuple(failed.shape)}")
        return [int(v) for v in failed.tolist()]
    return [int(v) for v in failed]


def recover(group, rank: Optional[int] = None) -> Recovery:
    """Collective among the surviving ranks of `group` (a moedist group name with `rank`, or a
    ProcessGroup given to moedist.get_comm_name) after a failed call. Returns at once, without
    communicating, when this rank saw no failure and no peer is recovering. A rank that the others
    declared failed (e.g. it was stopped too long) gets moedist.TransportError saying so."""
    name, r = _name_and_rank(group, rank)
    failed, generation, calls, newly = _C.recover_group(name, r)
    return Recovery(torch.tensor(failed, dtype=torch.int32), int(generation), int(calls), list(newly))


def query_active_mask(group, rank: Optional[int] = None) -> torch.Tensor:
    """The failed ranks agreed so far: int32 tensor (W,), 1 = failed (the masked ranks of other
    expert-parallel libraries' query_active_mask). Local: no communication."""
    name, r = _name_and_rank(group, rank)
    return torch.tensor(_C.query_active_mask(name, r), dtype=torch.int32)


def make_elastic_info(failed, shared_expert_rank_num: int, local_expert_num: int, shared_expert_num: int = 1) -> torch.Tensor:
    """elastic_info (int32, 4 + 2W) for the ops after the ranks in `failed` (one entry per rank,
    non-zero = failed) are gone: [1, W', Sr', E', original -> compact rank (-1: failed), compact ->
    original rank (-1 padded)]. Ranks keep their order."""
    return torch.tensor(_C.make_elastic_info(_mask_list(failed), int(shared_expert_rank_num), int(local_expert_num),
                                             int(shared_expert_num)), dtype=torch.int32)


def remap_expert_ids(expert_ids: torch.Tensor, failed, shared_expert_rank_num: int, local_expert_num: int,
                     replacements: Optional[Dict[int, int]] = None) -> torch.Tensor:
    """Expert ids of the original layout -> the compact layout after the failures (same shape and
    dtype). An id of an expert that lived on a failed rank raises ValueError naming it, unless
    `replacements` maps it to an expert (original id) on a surviving rank."""
    if not isinstance(expert_ids, torch.Tensor):
        raise TypeError(f"moedist.remap_expert_ids: expert_ids must be a torch.Tensor, got {type(expert_ids).__name__}")
    flat = [int(v) for v in expert_ids.reshape(-1).tolist()]
    out = _C.remap_expert_ids(flat, _mask_list(failed), int(shared_expert_rank_num), int(local_expert_num),
                              {int(k): int(v) for k, v in (replacements or {}).items()})
    return torch.tensor(out, dtype=expert_ids.dtype, device=expert_ids.device).reshape(expert_ids.shape)
