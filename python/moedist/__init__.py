"""moedist: npu_moe_distribute_dispatch_v2 / npu_moe_distribute_combine_v2 on CPU processes.

A stand-in for torch_npu's two MoE operators::

    import moedist
    ep_name = moedist.get_comm_name(ep_group, rank)     # as get_hccl_comm_name on Ascend
    expand_x, dynamic_scales, assist_info, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = \\
        moedist.npu_moe_distribute_dispatch_v2(x, expert_ids, ep_name, ep_world_size, ep_rank_id, moe_expert_num, ...)
    y = moedist.npu_moe_distribute_combine_v2(expert_out, expert_ids, assist_info, ep_recv_counts, expert_scales,
                                              ep_name, ep_world_size, ep_rank_id, moe_expert_num, ...)

For model code, moedist.EpBuffer / moedist.EpMoE wrap both ops around the local experts (any float
dtype, any leading shape, int64 router ids, a ProcessGroup), and moedist.hf.shard_experts(model) makes
a transformers MoE model expert-parallel.

The ops are torch custom operators (torch.ops.moedist.*) with fake implementations, so
torch.compile(model, fullgraph=True) traces models that call them. Errors: ValueError
(moedist.InvalidArgument) for invalid arguments, NotImplementedError (moedist.Unsupported),
RuntimeError (moedist.TransportError, moedist.Timeout) for communication failures; messages name the
rank, the parameter, its value and what is allowed.
"""
import torch  # noqa: F401  (moedist's ops are torch operators; torch must be importable)

from . import _C
from ._C import Error, InvalidArgument, Timeout, TransportError, Unsupported
from ._ops import (SplitHandle, combine_setup, combine_teardown, dispatch_setup, dispatch_teardown,
                   npu_moe_distribute_combine_add_rms_norm, npu_moe_distribute_combine_v2,
                   npu_moe_distribute_dispatch_v2)
from ._shapes import DispatchShapes, combine_shape, dispatch_shapes
from .layer import EpBuffer, EpHandle, EpMoE
from .failover import Recovery, make_elastic_info, query_active_mask, recover, remap_expert_ids
from .distributed import destroy_comm, get_comm_name, get_hccl_comm_name, init_thread_group
from .reference import reference_combine_add_rms_norm, reference_combine_v2, reference_dispatch_v2

__version__ = _C.__version__


def __getattr__(name):
    # moedist.hf (transformers integration) is imported on first use: importing moedist needs no transformers.
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'moedist' has no attribute {name!r}")

__all__ = [
    "npu_moe_distribute_dispatch_v2",
    "npu_moe_distribute_combine_v2",
    "npu_moe_distribute_combine_add_rms_norm",
    "dispatch_setup",
    "dispatch_teardown",
    "combine_setup",
    "combine_teardown",
    "SplitHandle",
    "get_comm_name",
    "get_hccl_comm_name",
    "destroy_comm",
    "init_thread_group",
    "reference_dispatch_v2",
    "reference_combine_v2",
    "reference_combine_add_rms_norm",
    "dispatch_shapes",
    "combine_shape",
    "DispatchShapes",
    "EpBuffer",
    "EpHandle",
    "EpMoE",
    "recover",
    "query_active_mask",
    "make_elastic_info",
    "remap_expert_ids",
    "Recovery",
    "Error",
    "InvalidArgument",
    "Unsupported",
    "TransportError",
    "Timeout",
]
