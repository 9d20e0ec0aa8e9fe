"""An expert-parallel MoE layer on top of the two operators.

The functional ops keep torch_npu's contract (bf16/fp16 hidden states, int32 expert ids, float32 gating
weights, 2-D tensors, communicator names, nine arguments repeated in combine). Model code has other
tensors: ids from torch.topk (int64), weights in the model's dtype, float32 models, hidden states of shape
(batch, seq, hidden). `EpBuffer` is the bridge:

    buf = moedist.EpBuffer(group, num_experts=64)                 # a ProcessGroup (or a name + rank + size)
    y = buf(x, topk_ids, topk_weights, experts)                    # dispatch -> local experts -> combine

or in two steps, with a handle that carries what dispatch returned into combine:

    recv_x, expert_token_nums, handle = buf.dispatch(x, topk_ids, topk_weights)
    expert_out = my_grouped_ffn(recv_x, expert_token_nums)         # rows grouped by local expert
    y = buf.combine(expert_out, handle)                            # x's dtype and shape

`EpMoE` is the same as an nn.Module that owns the local experts (and an optional shared expert).

Rows: dispatch produces A rows of expand_x (a size bound) of which only sum(expert_token_nums) are
written; `recv_x` is exactly those rows, grouped by local expert (expert_token_nums[e] rows of local
expert e, in that order), and combine reads exactly that many rows of the expert outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ._groups import _is_process_group, resolve_group
from ._C import TransportError
from ._ops import (_COMBINE, _DISPATCH, _group_fields, _reject, npu_moe_distribute_combine_v2,
                   npu_moe_distribute_dispatch_v2)

_WIRE_DTYPES = (torch.bfloat16, torch.float16)
_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _tensor(t, name: str, op: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} has type {type(t).__name__} (must be a torch.Tensor)")
    return t


@dataclass
class EpHandle:
    """What combine needs from a dispatch: the routing of this rank's tokens and where its rows went.

    Opaque to the experts; pass it to :meth:`EpBuffer.combine` once. Fields: the tensors dispatch returned
    that combine takes (assist_info_for_combine, ep_send_counts = dispatch's ep_recv_counts,
    tp_send_counts, expand_scales), this rank's routing as the ops take it (expert_ids int32 (T, K),
    expert_scales float32 (T, K), x_active_mask), num_rows (= sum(expert_token_nums), the rows the experts
    return), the input's shape and dtype (combine's output has them), the wire dtype and global_bs."""

    assist_info_for_combine: Tensor
    ep_send_counts: Tensor
    tp_send_counts: Tensor
    expand_scales: Tensor
    expert_ids: Tensor
    expert_scales: Tensor
    x_active_mask: Optional[Tensor]
    expert_token_nums: Tensor
    num_rows: int
    shape: torch.Size
    dtype: torch.dtype
    wire_dtype: torch.dtype
    global_bs: int
    used: bool = False


class EpBuffer:
    """Expert parallelism over one group: dispatch, combine, and both around the local experts.

    group: a torch.distributed ProcessGroup (its moedist communicator is built on first use, collectively:
    create the buffer on every rank of the group in the same order), or a communicator name from
    moedist.get_comm_name / init_thread_group together with `rank` and `world_size`.
    num_experts: routed experts in the model; rank r hosts experts [r*L, (r+1)*L), L = num_experts /
    world_size (must divide).
    wire_dtype: bfloat16 or float16, the dtype of the rows that travel (default: the input's dtype when it
    is one of them, else bfloat16). Inputs of any float dtype are cast to it; outputs come back in the
    input's dtype.
    quant_mode: 0, or 2 for dynamic per-token int8 on the dispatch wire (the rows reach the experts
    dequantized: int8 * dynamic_scales, in `expert_dtype`).
    expert_dtype: the dtype of the rows the experts get (default: the input's dtype).
    max_tokens_per_rank: None when every rank passes the same number of tokens in a call; an int bound
    when the counts differ (global_bs = bound * world_size; dispatch's buffers are sized by it); "auto"
    agrees on the maximum through the ProcessGroup in every call (one small all_reduce).
    comm_alg, timeout: passed on to the ops / get_comm_name.
    """

    def __init__(self, group, num_experts: int, *, rank: Optional[int] = None, world_size: Optional[int] = None,
                 wire_dtype: Optional[torch.dtype] = None, quant_mode: int = 0,
                 expert_dtype: Optional[torch.dtype] = None,
                 max_tokens_per_rank: Union[None, int, str] = None, comm_alg: str = "",
                 timeout: Optional[float] = None):
        op = "moedist.EpBuffer"
        self.process_group = None
        if _is_process_group(group):
            import torch.distributed as dist

            from .distributed import get_comm_name

            g_rank, g_world = dist.get_rank(group), dist.get_world_size(group)
            for pname, given, actual in (("rank", rank, g_rank), ("world_size", world_size, g_world)):
                if given is not None and given != actual:
                    raise ValueError(f"{op}: {pname}={given} but the process group says {actual}")
            self.process_group = group
            self.group_name = get_comm_name(group, timeout=timeout)
            rank, world_size = g_rank, g_world
        elif isinstance(group, str):
            if rank is None or world_size is None:
                raise ValueError(f"{op}: group is a communicator name ({group!r}): pass rank= and world_size= too "
                                 f"(or pass the torch.distributed ProcessGroup)")
            self.group_name = group
        else:
            resolve_group(group, "group", op)  # raises the TypeError
        for pname, v in (("num_experts", num_experts), ("rank", rank), ("world_size", world_size)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{op}: {pname} has type {type(v).__name__} (must be an int)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{op}: rank={rank}, world_size={world_size} (must be 0 <= rank < world_size)")
        if num_experts < 1 or num_experts % world_size:
            raise ValueError(f"{op}: num_experts={num_experts} (must be a positive multiple of "
                             f"world_size={world_size}: "
                             f"every rank hosts the same number of experts)")
        if wire_dtype is not None and wire_dtype not in _WIRE_DTYPES:
            raise ValueError(f"{op}: wire_dtype={wire_dtype} (must be torch.bfloat16, torch.float16 or None)")
        if quant_mode not in (0, 2):
            raise ValueError(f"{op}: quant_mode={quant_mode} (must be 0 or 2)")
        if expert_dtype is not None and not (isinstance(expert_dtype, torch.dtype) and expert_dtype.is_floating_point):
            raise ValueError(f"{op}: expert_dtype={expert_dtype} (must be a floating torch.dtype or None)")
        if max_tokens_per_rank == "auto":
            if self.process_group is None:
                raise ValueError(f"{op}: max_tokens_per_rank='auto' needs a ProcessGroup as group")
        elif max_tokens_per_rank is not None and (not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 0):
            raise ValueError(f"{op}: max_tokens_per_rank={max_tokens_per_rank!r} (must be None, 'auto' or an int >= 0)")
        self.rank, self.world_size, self.num_experts = rank, world_size, num_experts
        self.num_local_experts = num_experts // world_size
        self.wire_dtype, self.quant_mode, self.expert_dtype = wire_dtype, quant_mode, expert_dtype
        self.max_tokens_per_rank, self.comm_alg = max_tokens_per_rank, comm_alg

    # ---- the experts of this rank ----

    @property
    def local_experts(self) -> range:
        """The global ids of the experts this rank hosts (local expert e is global expert first + e)."""
        first = self.rank * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def shard(self, stacked: Tensor, dim: int = 0) -> Tensor:
        """This rank's slice of a tensor stacked over all experts along `dim` (a copy that owns its memory)."""
        if stacked.shape[dim] != self.num_experts:
            raise ValueError(f"moedist.EpBuffer.shard: stacked has {stacked.shape[dim]} entries along dim {dim} "
                             f"(must be num_experts={self.num_experts})")
        return stacked.narrow(dim, self.local_experts.start, self.num_local_experts).clone()

    def _global_bs(self, tokens: int) -> int:
        m = self.max_tokens_per_rank
        return 0 if m is None else m * self.world_size

    # ---- the two steps ----

    def dispatch(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, *,
                 x_active_mask: Optional[Tensor] = None):
        """Sends every token to the ranks of its top-k experts.

        x: (..., H), any float dtype. topk_ids: (..., K) of any integer dtype, with the same leading
        dimensions as x (or flattened to (T, K)), values in [0, num_experts) and distinct within a token.
        topk_weights: the gating weights, any float dtype, shape as topk_ids (used by combine; they
        travel no further). x_active_mask: optional bool (...,) or (..., K): inactive tokens / slots are
        not sent and their output rows are zeros.
        Returns (recv_x, expert_token_nums, handle): recv_x (rows, H) in expert_dtype (default x.dtype),
        the rows this rank's experts must process, grouped by local expert; expert_token_nums (L,) int64,
        rows per local expert (sum = rows); handle for :meth:`combine`.
        """
        err = None
        try:
            xw, ids, weights, mask, T = self._dispatch_inputs(x, topk_ids, topk_weights, x_active_mask)
        except (TypeError, ValueError) as e:
            err = e
        if self.max_tokens_per_rank == "auto":
            # Every rank joins the agreement, also one that refused its arguments (it says so there), so
            # that no rank waits in the all_reduce for a rank that will not come.
            import torch.distributed as dist

            t = torch.tensor([0 if err else T, self.rank + 1 if err else 0], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
            if err is None and int(t[1]):
                raise TransportError(f"[rank {self.rank}/{self.world_size}] moedist.EpBuffer.dispatch: rank "
                                     f"{int(t[1]) - 1} rejected its call (its error names the argument)")
            global_bs = int(t[0]) * self.world_size
        if err is not None:
            if self.max_tokens_per_rank != "auto":  # with "auto" the peers learnt it in the agreement
                self._tell_peers(_DISPATCH, err)
            raise err
        if self.max_tokens_per_rank != "auto":
            global_bs = self._global_bs(T)
        try:
            expand_x, dynamic_scales, assist, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = \
                npu_moe_distribute_dispatch_v2(xw, ids, self.group_name, self.world_size, self.rank, self.num_experts,
                                               x_active_mask=mask, quant_mode=self.quant_mode, global_bs=global_bs,
                                               expert_token_nums_type=1, comm_alg=self.comm_alg)
        except ValueError as e:
            if global_bs == 0 and "global_bs=0" in str(e):
                raise type(e)(f"{e}; moedist.EpBuffer: the ranks pass different token counts, so create the "
                              f"buffer with max_tokens_per_rank (a bound, or 'auto')") from None
            raise
        rows = int(expert_token_nums.sum()) if expert_token_nums.numel() else 0
        out_dtype = self.expert_dtype or x.dtype
        recv = expand_x[:rows]
        if self.quant_mode == 2:
            recv = (recv.to(torch.float32) * dynamic_scales[:rows, None]).to(out_dtype)
        else:
            recv = recv.to(out_dtype)
        handle = EpHandle(assist_info_for_combine=assist, ep_send_counts=ep_recv_counts, tp_send_counts=tp_recv_counts,
                          expand_scales=expand_scales, expert_ids=ids, expert_scales=weights, x_active_mask=mask,
                          expert_token_nums=expert_token_nums, num_rows=rows, shape=x.shape, dtype=x.dtype,
                          wire_dtype=xw.dtype, global_bs=global_bs)
        return recv, expert_token_nums, handle

    def _tell_peers(self, op: str, err: BaseException) -> None:
        # A rank that refuses its arguments before the collective tells its peers, so they fail at once
        # naming it instead of waiting for it until their deadline.
        _reject(op, err, _group_fields(self.group_name, self.world_size, self.rank, None, "", 0, 0))

    def _dispatch_inputs(self, x, topk_ids, topk_weights, x_active_mask):
        op = "moedist.EpBuffer.dispatch"
        x = _tensor(x, "x", op)
        topk_ids = _tensor(topk_ids, "topk_ids", op)
        topk_weights = _tensor(topk_weights, "topk_weights", op)
        if not x.is_floating_point() or x.dim() < 1:
            raise ValueError(f"{op}: x has dtype {_dtype_name(x.dtype)} and shape {tuple(x.shape)} "
                             f"(must be a floating tensor of shape (..., hidden))")
        if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
            raise ValueError(f"{op}: topk_ids has dtype {_dtype_name(topk_ids.dtype)} (must be an integer dtype)")
        if not topk_weights.is_floating_point():
            raise ValueError(f"{op}: topk_weights has dtype {_dtype_name(topk_weights.dtype)} "
                             f"(must be a floating dtype)")
        H = x.shape[-1]
        T = math.prod(x.shape[:-1])
        if topk_ids.dim() < 1:
            raise ValueError(f"{op}: topk_ids has shape {tuple(topk_ids.shape)} (must be (..., K))")
        K = topk_ids.shape[-1]
        if topk_ids.numel() != T * K or not (topk_ids.shape[:-1] == x.shape[:-1] or topk_ids.dim() == 2):
            raise ValueError(f"{op}: topk_ids has shape {tuple(topk_ids.shape)} but x has shape {tuple(x.shape)} "
                             f"(must be x's leading dimensions + (K,), or ({T}, K))")
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(f"{op}: topk_weights has shape {tuple(topk_weights.shape)} (must match topk_ids: "
                             f"{tuple(topk_ids.shape)})")
        ids = topk_ids.reshape(T, K)
        if ids.dtype != torch.int32:
            wide = (torch.int64, getattr(torch, "uint32", None), getattr(torch, "uint64", None))
            if ids.numel() and ids.dtype in wide:
                lo, hi = int(ids.min()), int(ids.max())
                if lo < _INT32_MIN or hi > _INT32_MAX:
                    bad = lo if lo < _INT32_MIN else hi
                    raise ValueError(f"{op}: [rank {self.rank}/{self.world_size}] topk_ids holds {bad} (must be in "
                                     f"[0, num_experts={self.num_experts}))")
            ids = ids.to(torch.int32)
        weights = topk_weights.reshape(T, K).to(torch.float32)
        mask = None
        if x_active_mask is not None:
            mask = _tensor(x_active_mask, "x_active_mask", op)
            if mask.shape == x.shape[:-1]:
                mask = mask.reshape(T)
            elif mask.shape == topk_ids.shape:
                mask = mask.reshape(T, K)
            else:
                raise ValueError(f"{op}: x_active_mask has shape {tuple(mask.shape)} (must be x's leading dimensions "
                                 f"{tuple(x.shape[:-1])} or topk_ids' shape {tuple(topk_ids.shape)})")
        wire = self.wire_dtype or (x.dtype if x.dtype in _WIRE_DTYPES else torch.bfloat16)
        xw = x.reshape(T, H).to(wire)
        if isinstance(self.max_tokens_per_rank, int) and T > self.max_tokens_per_rank:
            raise ValueError(f"moedist.EpBuffer.dispatch: [rank {self.rank}/{self.world_size}] {T} tokens "
                             f"(more than max_tokens_per_rank={self.max_tokens_per_rank})")
        return xw, ids, weights, mask, T

    def combine(self, expert_out: Tensor, handle: EpHandle, *, shared_expert_x: Optional[Tensor] = None) -> Tensor:
        """Brings the expert outputs back and sums them with the gating weights (k ascending, in float32,
        each product rounded before the add), plus shared_expert_x unweighted.

        expert_out: (rows, H) in any float dtype, row i the output for recv_x[i] (rows past handle.num_rows
        are ignored). shared_expert_x: optional, x's shape, any float dtype. Returns x's shape and dtype
        (the sum is rounded to the wire dtype first).
        """
        try:
            out, sx = self._combine_inputs(expert_out, handle, shared_expert_x)
        except (TypeError, ValueError) as e:
            self._tell_peers(_COMBINE, e)
            raise
        y = npu_moe_distribute_combine_v2(out, handle.expert_ids, handle.assist_info_for_combine, handle.ep_send_counts,
                                          handle.expert_scales, self.group_name, self.world_size, self.rank,
                                          self.num_experts, tp_send_counts=handle.tp_send_counts,
                                          x_active_mask=handle.x_active_mask, shared_expert_x=sx,
                                          global_bs=handle.global_bs, comm_alg=self.comm_alg)
        handle.used = True
        return y.to(handle.dtype).reshape(handle.shape)

    def _combine_inputs(self, expert_out, handle, shared_expert_x):
        op = "moedist.EpBuffer.combine"
        if not isinstance(handle, EpHandle):
            raise TypeError(f"{op}: handle has type {type(handle).__name__} "
                            f"(must be the EpHandle that dispatch returned)")
        if handle.used:
            raise ValueError(f"{op}: this handle was already combined (each dispatch is combined once)")
        expert_out = _tensor(expert_out, "expert_out", op)
        H = handle.shape[-1]
        if (not expert_out.is_floating_point() or expert_out.dim() != 2 or expert_out.shape[1] != H
                or expert_out.shape[0] < handle.num_rows):
            raise ValueError(f"{op}: [rank {self.rank}/{self.world_size}] expert_out has dtype "
                             f"{_dtype_name(expert_out.dtype)} and shape {tuple(expert_out.shape)} (must be a "
                             f"floating (rows, {H}) tensor with rows >= {handle.num_rows}, the rows dispatch returned)")
        out = expert_out[:handle.num_rows].to(handle.wire_dtype)
        T = handle.expert_ids.shape[0]
        sx = None
        if shared_expert_x is not None:
            sx = _tensor(shared_expert_x, "shared_expert_x", op)
            if not sx.is_floating_point() or sx.numel() != T * H:
                raise ValueError(f"{op}: shared_expert_x has dtype {_dtype_name(sx.dtype)} and shape "
                                 f"{tuple(sx.shape)} (must be a floating tensor of x's shape {tuple(handle.shape)})")
            sx = sx.reshape(T, H).to(handle.wire_dtype)
        return out, sx

    # ---- both around the experts ----

    def __call__(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                 experts: Union[Sequence[Callable[[Tensor], Tensor]], Callable[[Tensor, Tensor], Tensor]], *,
                 shared_expert: Optional[Callable[[Tensor], Tensor]] = None,
                 x_active_mask: Optional[Tensor] = None) -> Tensor:
        """dispatch -> experts -> combine. experts: a sequence of L callables (local expert e gets its rows,
        (n_e, H), and returns (n_e, H)), or one callable f(recv_x, expert_token_nums) -> (rows, H) for a
        grouped implementation. shared_expert: optional callable on x (same shape in, same shape out),
        computed locally on every rank and added unweighted in the combine's sum."""
        recv_x, counts, handle = self.dispatch(x, topk_ids, topk_weights, x_active_mask=x_active_mask)
        expert_out = run_local_experts(experts, recv_x, counts, self.num_local_experts)
        sx = shared_expert(x) if shared_expert is not None else None
        return self.combine(expert_out, handle, shared_expert_x=sx)


def run_local_experts(experts, recv_x: Tensor, expert_token_nums: Tensor, num_local_experts: int) -> Tensor:
    """Runs per-expert callables on their row groups (or one grouped callable on all rows)."""
    op = "moedist.EpBuffer"
    if isinstance(experts, (list, tuple, torch.nn.ModuleList)):
        if len(experts) != num_local_experts:
            raise ValueError(f"{op}: experts has {len(experts)} entries (must be one per local expert: "
                             f"{num_local_experts})")
        counts = expert_token_nums.tolist()
        out = None
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            y = experts[e](recv_x[start:start + n])
            if out is None:
                out = recv_x.new_empty((recv_x.shape[0],) + tuple(y.shape[1:]), dtype=y.dtype)
            out[start:start + n] = y
            start += n
        return out if out is not None else recv_x.new_empty((0, recv_x.shape[1]))
    if callable(experts):
        return experts(recv_x, expert_token_nums)
    raise TypeError(f"{op}: experts has type {type(experts).__name__} (must be a list of one callable per local "
                    f"expert, or a callable f(recv_x, expert_token_nums))")


class EpMoE(torch.nn.Module):
    """An MoE layer whose routed experts are spread over a group: this rank owns its local experts.

    experts: nn.ModuleList of the L local experts (each maps (n, H) -> (n, H)), or one module called as
    experts(recv_x, expert_token_nums). shared_expert: optional module on the whole input, added
    unweighted. forward(x, topk_ids, topk_weights, x_active_mask=None) -> x's shape and dtype; the router
    stays with the caller (its ids and weights are taken as they come: any integer / float dtype).
    Other keyword arguments build the EpBuffer (see there).
    """

    def __init__(self, group, num_experts: int, experts, shared_expert: Optional[torch.nn.Module] = None, **kw):
        super().__init__()
        self.buffer = EpBuffer(group, num_experts, **kw)
        if isinstance(experts, (list, tuple)):
            experts = torch.nn.ModuleList(experts)
        self.experts = experts
        self.shared_expert = shared_expert

    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                x_active_mask: Optional[Tensor] = None) -> Tensor:
        return self.buffer(x, topk_ids, topk_weights, self.experts, shared_expert=self.shared_expert,
                           x_active_mask=x_active_mask)
