"""Communicators for torch.distributed process groups.

On Ascend a program gets the HCCL communicator name of a process group and passes it as group_ep /
group_tp:

    ep_name = ep_group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)

With moedist the same step is

    ep_name = moedist.get_comm_name(ep_group, rank)

which, collectively over the group's ranks (every member calls it, in the same order for different
groups, as with dist.new_group), agrees on a job id through the process group (an all_gather_object:
the group's backend must handle CPU objects, e.g. gloo), builds moedist's shared-memory communicator
over the same ranks (rank i of the process group is ep/tp rank i) and registers it under the returned
name. Later calls for the same group return the name without communicating.

A group whose ranks are processes on one host gets the shared-memory transport. A group spanning hosts
(torchrun --nnodes 2 and more) gets shared memory inside each host and UCX between hosts (Debian: libucx0;
UCX picks the network: InfiniBand/RoCE where present, else TCP; UCX_TLS and UCX_NET_DEVICES steer it),
bootstrapped through the same process group. Hosts are told apart by host name, boot id and network
namespace, so containers of one machine count as hosts of their own. comm_alg "hierarchy" then takes the
hosts as its servers when they hold consecutive, equal blocks of ranks (as torchrun numbers them) unless
ranks_per_server says otherwise.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import uuid
from typing import Optional, Union

from . import _C

_lock = threading.Lock()
_comms: dict = {}  # id(process group) -> (process group, name); the group is kept alive with its name


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _netns() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def _pg_label(dist, pg) -> str:
    name = None
    try:
        name = dist.distributed_c10d._get_process_group_name(pg)
    except Exception:
        name = getattr(pg, "group_name", None)
    return re.sub(r"[^A-Za-z0-9_]", "_", str(name if name is not None else "pg"))[:40]


def get_comm_name(group=None, rank: Optional[int] = None, *, timeout: Optional[float] = None,
                  ranks_per_server: int = 0) -> str:
    """The name of moedist's communicator over the ranks of a torch.distributed process group.

    group: a ProcessGroup (default: the default group). rank: optional, as in get_hccl_comm_name(rank):
    the caller's global rank (checked). timeout: seconds every wait inside one collective may take
    (default: MOEDIST_TIMEOUT_MS or 60 s). ranks_per_server: ranks per server for comm_alg "hierarchy"
    (0: one server of all ranks on one host; the hosts when the group spans several). Collective on the
    first call for a group; idempotent after.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("moedist.get_comm_name: torch.distributed is not initialized (call dist.init_process_group first)")
    pg = group if group is not None else dist.group.WORLD
    grank = dist.get_rank(pg)
    if grank < 0:
        raise ValueError(f"moedist.get_comm_name: this process (global rank {dist.get_rank()}) is not a member of the group")
    if rank is not None and rank != dist.get_rank():
        raise ValueError(f"moedist.get_comm_name: rank={rank} but this process is global rank {dist.get_rank()} "
                         f"(rank {grank} of the group)")
    with _lock:
        hit = _comms.get(id(pg))
        if hit is not None and hit[0] is pg:
            return hit[1]
        world = dist.get_world_size(pg)
        mine = (uuid.uuid4().hex[:16], socket.gethostname(), _boot_id(), _netns(), os.getpid())
        info = [None] * world
        dist.all_gather_object(info, mine, group=pg)
        job = info[0][0]
        name = f"moedist_{_pg_label(dist, pg)}_{job[:8]}"
        timeout_ms = int(round(timeout * 1000)) if timeout is not None else 0
        host_index: dict = {}
        host_of = [host_index.setdefault((h, b, n), len(host_index)) for _, h, b, n, _ in info]
        if len(host_index) == 1:
            _C.init_shm_group(name, world, grank, job, timeout_ms, ranks_per_server)
        else:
            if not _C.ucx_available():
                where = "; ".join(f"rank {r}: {h}" for r, (_, h, _, _, _) in enumerate(info))
                raise _C.Unsupported(
                    f"moedist.get_comm_name: the group spans several hosts ({where}) and this build of moedist has no UCX "
                    f"transport (install libucx-dev and reinstall moedist)")

            def allgather(b: bytes) -> list:
                out = [None] * world
                dist.all_gather_object(out, b, group=pg)
                return out

            _C.init_ucx_group(name, world, grank, job, host_of, allgather, timeout_ms, ranks_per_server)
        _comms[id(pg)] = (pg, name)
        return name


get_hccl_comm_name = get_comm_name


def destroy_comm(group_or_name: Union[str, object]) -> None:
    """Unregisters a communicator (by process group or name). Tensors it returned stay valid."""
    with _lock:
        if isinstance(group_or_name, str):
            name = group_or_name
            for k, (_, n) in list(_comms.items()):
                if n == name:
                    del _comms[k]
        else:
            hit = _comms.pop(id(group_or_name), None)
            if hit is None:
                return
            name = hit[1]
        _C.unregister_group(name)


def init_thread_group(name: str, world_size: int, *, timeout: Optional[float] = None, ranks_per_server: int = 0) -> str:
    """Registers `name` for `world_size` ranks that are threads of this process (each thread calls the ops
    with its ep_rank_id; the ops release the GIL while they wait)."""
    timeout_ms = int(round(timeout * 1000)) if timeout is not None else 0
    _C.init_thread_group(name, world_size, timeout_ms, ranks_per_server)
    return name
