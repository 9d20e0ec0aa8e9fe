"""The "hccl" process-group backend on gloo, and the HCCL communicator name of a group.

dist.init_process_group(backend="hccl") and dist.new_group(backend="hccl") create gloo process groups
(tensors are in host memory); "cpu:gloo,npu:hccl"-style strings work the same way. An Ascend program
asks a group for the name of its HCCL communicator and passes it to the MoE operators as group_ep /
group_tp:

    group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)     # torch >= 2.1
    group.get_hccl_comm_name(rank)                                        # older torch_npu

Both return moedist.get_comm_name(group): moedist's shared-memory communicator over the group's ranks.
The first call for a group is collective over its members (every member calls it, groups in the same
order), as in the Ascend examples and vLLM-Ascend, where every member asks for the name at set-up.
`rank` may be the caller's global rank or its rank in the group (both forms are in use); another value
is an error.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import distributed as _md

_installed = False


def _create_hccl(store, group_rank, group_size, timeout):
    return dist.ProcessGroupGloo(store, group_rank, group_size, timeout)


def hccl_comm_name(pg, rank=None) -> str:
    if rank is not None:
        grank, wrank = dist.get_rank(pg), dist.get_rank()
        if int(rank) not in (grank, wrank):
            raise ValueError(f"get_hccl_comm_name: rank={rank} is neither this process's global rank ({wrank}) "
                             f"nor its rank in the group ({grank})")
    return _md.get_comm_name(pg)


class HcclBackend:
    """What group._get_backend(torch.device("npu")) returns: the group's gloo backend, with
    get_hccl_comm_name(rank) answering moedist's communicator name."""

    def __init__(self, pg, backend):
        self._pg = pg
        self._backend = backend

    def get_hccl_comm_name(self, rank=None) -> str:
        return hccl_comm_name(self._pg, rank)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def install() -> None:
    global _installed
    if _installed:
        return
    if "hccl" not in dist.Backend.backend_list:
        dist.Backend.register_backend("hccl", _create_hccl, devices=["cpu"])
    pg_cls = dist.ProcessGroup
    get_backend = pg_cls._get_backend

    def _get_backend(self, device):
        if isinstance(device, str):
            device = torch.device(device)
        if isinstance(device, torch.device) and device.type == "npu":
            return HcclBackend(self, get_backend(self, torch.device("cpu")))
        return get_backend(self, device)

    pg_cls._get_backend = _get_backend
    pg_cls.get_hccl_comm_name = lambda self, rank=None: hccl_comm_name(self, rank)
    _installed = True
