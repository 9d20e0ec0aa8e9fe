"""The two operators as torch.library operators, and the public functions with the Ascend signatures.

torch.ops.moedist.npu_moe_distribute_dispatch_v2 / npu_moe_distribute_combine_v2 are registered with
torch.library (a schema inferred from the kernel's annotations, the kernel for every backend, a fake
kernel): their real implementation calls the C++ core, their fake implementation gives the output shapes
from the integer arguments and input shapes (moedist._shapes), so torch.compile (fullgraph=True) traces
a model that calls them into one graph, as torchair does on Ascend.
The public functions moedist.npu_moe_distribute_dispatch_v2 / _combine_v2 take exactly the arguments of
torch_npu's functions (names, order, keyword-only marker, defaults); called eagerly with plain CPU tensors
they call the C++ core directly (see "The eager path" below), otherwise the torch.library operators.
"""
from __future__ import annotations

import inspect
import operator
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C
from ._convert import DTYPE_CODES, from_capsule, view
from ._shapes import combine_shape, dispatch_shapes
from ._groups import resolve_group

_DISPATCH = "npu_moe_distribute_dispatch_v2"
_COMBINE = "npu_moe_distribute_combine_v2"

# The eager path: the public functions hand their arguments straight to the C++ entry points
# (_C.dispatch_v2_eager / combine_v2_eager), which read plain CPU tensors, ints and strs through the
# Python C API and release the GIL for the collective. They return None for any argument they do not
# take as it is (a tensor subclass, one requiring grad, a meta/sparse/non-CPU tensor, an unknown dtype,
# an int-like that is not an int, ...), and calls with a performance_info tensor (which they do not take)
# are not given to them: the call then goes the checked way (Python checks, rejection sent
# to the peers, the torch.library operator), whose results and errors are the eager path's. Calls made
# while torch.compile traces, or under a torch function/dispatch mode (FakeTensorMode, make_fx), a
# functorch transform or torch.jit tracing, always go through the operator.
_C.set_torch(torch.Tensor, sorted(DTYPE_CODES, key=DTYPE_CODES.get), torch.strided, torch._C._from_dlpack)
_dispatch_eager = _C.dispatch_v2_eager
_combine_eager = _C.combine_v2_eager
_is_compiling = torch.compiler.is_compiling
_tf_modes = torch._C._len_torch_function_stack
_td_modes = torch._C._len_torch_dispatch_stack
_functorch = torch._C._are_functorch_transforms_active
_jit_tracing = torch._C._get_tracing_state


def _plain_eager() -> bool:
    """No torch function/dispatch mode, functorch transform or jit trace is active (the caller has
    checked torch.compiler.is_compiling() first, so that a traced call never gets here)."""
    return not (_tf_modes() or _td_modes() or _functorch() or _jit_tracing() is not None)



def _dispatch_kwargs(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales, x_active_mask,
                     expert_scales, elastic_info, performance_info, group_tp, tp_world_size, tp_rank_id, expert_shard_type,
                     shared_expert_num, shared_expert_rank_num, quant_mode, global_bs, expert_token_nums_type,
                     comm_alg, zero_expert_num, copy_expert_num, const_expert_num) -> dict:
    op = _DISPATCH
    return dict(
        x=view(x, "x", op), expert_ids=view(expert_ids, "expert_ids", op), group_ep=group_ep,
        ep_world_size=ep_world_size, ep_rank_id=ep_rank_id, moe_expert_num=moe_expert_num,
        scales=view(scales, "scales", op), x_active_mask=view(x_active_mask, "x_active_mask", op),
        expert_scales=view(expert_scales, "expert_scales", op), elastic_info=view(elastic_info, "elastic_info", op),
        performance_info=_performance_view(performance_info, op), group_tp=group_tp, tp_world_size=tp_world_size, tp_rank_id=tp_rank_id, expert_shard_type=expert_shard_type,
        shared_expert_num=shared_expert_num, shared_expert_rank_num=shared_expert_rank_num, quant_mode=quant_mode,
        global_bs=global_bs, expert_token_nums_type=expert_token_nums_type, comm_alg=comm_alg,
        zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)


def _combine_kwargs(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep,
                    ep_world_size, ep_rank_id, moe_expert_num, tp_send_counts, x_active_mask, expand_scales,
                    shared_expert_x, elastic_info, ori_x, const_expert_alpha_1, const_expert_alpha_2, const_expert_v,
                    performance_info, group_tp, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
                    shared_expert_rank_num, global_bs, comm_quant_mode, comm_alg, zero_expert_num, copy_expert_num,
                    const_expert_num) -> dict:
    op = _COMBINE
    return dict(
        expand_x=view(expand_x, "expand_x", op), expert_ids=view(expert_ids, "expert_ids", op),
        assist_info_for_combine=view(assist_info_for_combine, "assist_info_for_combine", op),
        ep_send_counts=view(ep_send_counts, "ep_send_counts", op), expert_scales=view(expert_scales, "expert_scales", op),
        group_ep=group_ep, ep_world_size=ep_world_size, ep_rank_id=ep_rank_id, moe_expert_num=moe_expert_num,
        tp_send_counts=view(tp_send_counts, "tp_send_counts", op), x_active_mask=view(x_active_mask, "x_active_mask", op),
        expand_scales=view(expand_scales, "expand_scales", op), shared_expert_x=view(shared_expert_x, "shared_expert_x", op),
        elastic_info=view(elastic_info, "elastic_info", op), ori_x=view(ori_x, "ori_x", op),
        const_expert_alpha_1=view(const_expert_alpha_1, "const_expert_alpha_1", op),
        const_expert_alpha_2=view(const_expert_alpha_2, "const_expert_alpha_2", op),
        const_expert_v=view(const_expert_v, "const_expert_v", op),
        performance_info=_performance_view(performance_info, op), group_tp=group_tp, tp_world_size=tp_world_size, tp_rank_id=tp_rank_id, expert_shard_type=expert_shard_type,
        shared_expert_num=shared_expert_num, shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs,
        comm_quant_mode=comm_quant_mode, comm_alg=comm_alg, zero_expert_num=zero_expert_num,
        copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)


def _performance_view(t, op: str):
    """performance_info as the C++ core takes it; the core checks dtype, shape and contiguity. The op adds
    into its memory, so it must be this process's memory: a tensor on another device is refused here."""
    if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta"):
        shape = "(" + ", ".join(str(int(n)) for n in t.shape) + ("," if t.dim() == 1 else "") + ")"
        raise _C.InvalidArgument(
            f"{op}: performance_info is a {shape} {str(t.dtype).replace('torch.', '')} tensor on device {t.device} "
            f"(must be a contiguous (ep_world_size,) int64 tensor in CPU memory, where moedist adds its wait times)")
    return view(t, "performance_info", op)


# ---- rejections before the collective ----
# A rank that refuses its arguments in Python never reaches the C++ op, so its peers would wait for it
# until their deadline. It tells them instead (the C++ core does the same for what it rejects), so they
# fail at once with an error naming this rank and the reason.

def _group_fields(group_ep, ep_world_size, ep_rank_id, elastic_info, group_tp, tp_world_size, tp_rank_id) -> dict:
    d = {}
    for k, v, t in (("group_ep", group_ep, str), ("ep_world_size", ep_world_size, int), ("ep_rank_id", ep_rank_id, int),
                    ("group_tp", group_tp, str), ("tp_world_size", tp_world_size, int), ("tp_rank_id", tp_rank_id, int)):
        if isinstance(v, t) and not isinstance(v, bool):
            d[k] = v
    if (isinstance(elastic_info, torch.Tensor) and elastic_info.device.type == "cpu" and elastic_info.dtype == torch.int32
            and elastic_info.layout == torch.strided):
        d["elastic_info"] = view(elastic_info, "elastic_info", "")
    return d


def _reject(op: str, err: BaseException, fields: dict) -> None:
    fn = _C.reject_dispatch_v2 if op == _DISPATCH else _C.reject_combine_v2
    try:
        fn(fields, f"{type(err).__name__}: {err}")
    except Exception:  # noqa: BLE001 - the caller raises the original error
        pass


def _resolve_groups(op, group_ep, group_tp, ep_world_size, ep_rank_id, elastic_info, tp_world_size, tp_rank_id):
    """group_ep / group_tp as names (a ProcessGroup is resolved); a wrong type is refused, and the peers are
    told when the other group is known."""
    ep, tp = group_ep, group_tp
    try:
        ep = resolve_group(group_ep, "group_ep", op)
        tp = resolve_group(group_tp, "group_tp", op)
    except TypeError as e:
        _reject(op, e, _group_fields(ep, ep_world_size, ep_rank_id, elastic_info, tp, tp_world_size, tp_rank_id))
        raise
    return ep, tp


_INT_ARGS = ("ep_world_size", "ep_rank_id", "moe_expert_num", "tp_world_size", "tp_rank_id", "expert_shard_type",
             "shared_expert_num", "shared_expert_rank_num", "quant_mode", "global_bs", "expert_token_nums_type",
             "comm_quant_mode", "zero_expert_num", "copy_expert_num", "const_expert_num")
_STR_ARGS = ("group_ep", "group_tp", "comm_alg")


def _precheck(op: str, args: dict) -> None:
    """What torch's dispatcher would refuse, or route away from moedist, before the op runs: wrong
    argument types, sparse tensors, meta tensors among real ones. (A call whose tensors are all meta
    tensors infers the output shapes and does not communicate.)"""
    tensors = [v for v in args.values() if isinstance(v, torch.Tensor)]
    all_meta = bool(tensors) and all(t.is_meta for t in tensors)
    for name, v in args.items():
        if name in _INT_ARGS:
            try:
                operator.index(v)
            except TypeError:
                raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}") from None
        elif name in _STR_ARGS:
            if not isinstance(v, str):
                raise TypeError(f"{op}: {name} must be a str, got {type(v).__name__}")
        elif v is not None:
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(v).__name__}")
            if v.is_meta and not all_meta:
                raise ValueError(f"{op}: {name} is a meta tensor (it has no data; moedist runs on CPU tensors)")
            if v.layout != torch.strided:
                raise ValueError(f"{op}: {name} has layout {v.layout} (must be a dense, strided tensor)")


def _checked(op: str, args: dict) -> None:
    if torch.compiler.is_compiling():
        return  # traced: the op's own implementation checks at run time
    try:
        _precheck(op, args)
    except Exception as e:
        _reject(op, e, _group_fields(args["group_ep"], args["ep_world_size"], args["ep_rank_id"], args.get("elastic_info"),
                                     args["group_tp"], args["tp_world_size"], args["tp_rank_id"]))
        raise


# ---- the torch.library operators ----

# Registered with torch.library.Library rather than the torch.library.custom_op decorator: to torch they
# are the same operators (schema, kernel, fake kernel for FakeTensorMode and torch.compile, an autograd
# kernel), but a call through torch.ops, and every call from a compiled graph, skips custom_op's own
# Python layers, which cost 25-40 us a call (docs/perf.md, "The Python package").
_lib = torch.library.Library("moedist", "DEF")
_grad_enabled = torch.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad
_after_autograd = torch._C._after_autograd_keyset
_below_autograd = torch._C._AutoDispatchBelowAutograd
# A call whose dispatch keys below autograd are only CPU (no mode, fake or meta tensor, functorch level):
# the autograd kernel calls the kernel itself.
_PLAIN_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU).raw_repr()
_AD_INPLACE_OR_VIEW = torch._C.DispatchKey.ADInplaceOrView


class _NoDerivative(torch.autograd.Function):
    """A call with inputs that require grad: the outputs are made as without them, and a backward pass
    through them is an error (the operators have no derivative), not a silent zero gradient."""

    @staticmethod
    def forward(ctx, op, keyset, *args):
        ctx.op_name = op._name
        with _below_autograd():
            return op.redispatch(keyset & _after_autograd, *args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.op_name} has no derivative: moedist's operators are not differentiable (nothing "
                           "flows back through dispatch and combine); detach the inputs that require grad, or "
                           "leave the operator out of the backward pass")


def _operator(name: str):
    """Registers the decorated function as the kernel of moedist::<name> for every backend, with the schema
    its annotations give (no argument mutated), and the operator's autograd kernel."""
    def register(fn):
        _lib.define(name + torch.library.infer_schema(fn, mutates_args=()), tags=(torch.Tag.pt2_compliant_tag,))
        _lib.impl(name, fn, "CompositeExplicitAutograd")
        op = getattr(torch.ops.moedist, name).default

        def autograd_kernel(keyset, *args):
            if _grad_enabled() and _any_requires_grad(*args):
                return _NoDerivative.apply(op, keyset, *args)
            if (keyset & _after_autograd).remove(_AD_INPLACE_OR_VIEW).raw_repr() == _PLAIN_CPU:
                return fn(*args)  # what the dispatcher would reach below autograd, without going back to it
            with _below_autograd():
                return op.redispatch(keyset & _after_autograd, *args)

        _lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)
        return fn
    return register


def _fake(name: str):
    return torch.library.register_fake(f"moedist::{name}", lib=_lib)


# performance_info is not declared mutated (mutates_args): with an optional argument declared mutable,
# inductor fails to lower the op (torch.compile's default backend, even when None is passed). The kernel
# adds into the caller's tensor in place, which compiled graphs hand to it as it is (a compiled call names
# the slow rank as an eager one does: tests/python/test_distributed.py); a graph that reads the tensor
# after the op within the same compiled region may see the value from before the call.
@_operator("npu_moe_distribute_dispatch_v2")
def _dispatch_op(x: Tensor, expert_ids: Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int,
                 moe_expert_num: int, scales: Optional[Tensor], x_active_mask: Optional[Tensor],
                 expert_scales: Optional[Tensor], elastic_info: Optional[Tensor],
                 performance_info: Optional[Tensor], group_tp: str, tp_world_size: int,
                 tp_rank_id: int, expert_shard_type: int, shared_expert_num: int, shared_expert_rank_num: int,
                 quant_mode: int, global_bs: int, expert_token_nums_type: int, comm_alg: str, zero_expert_num: int,
                 copy_expert_num: int, const_expert_num: int
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = None if performance_info is not None else _dispatch_eager(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales, x_active_mask,
                          expert_scales, elastic_info, group_tp, tp_world_size, tp_rank_id, expert_shard_type,
                          shared_expert_num, shared_expert_rank_num, quant_mode, global_bs, expert_token_nums_type,
                          comm_alg, zero_expert_num, copy_expert_num, const_expert_num)
    if out is not None:
        return out
    try:
        args = _dispatch_kwargs(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales,
                                x_active_mask, expert_scales, elastic_info, performance_info, group_tp, tp_world_size, tp_rank_id,
                                expert_shard_type, shared_expert_num, shared_expert_rank_num, quant_mode, global_bs,
                                expert_token_nums_type, comm_alg, zero_expert_num, copy_expert_num, const_expert_num)
    except Exception as e:
        _reject(_DISPATCH, e, _group_fields(group_ep, ep_world_size, ep_rank_id, elastic_info, group_tp, tp_world_size,
                                            tp_rank_id))
        raise
    return tuple(from_capsule(c) for c in _C.dispatch_v2(args))


@_fake("npu_moe_distribute_dispatch_v2")
def _dispatch_fake(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales, x_active_mask,
                   expert_scales, elastic_info, performance_info, group_tp, tp_world_size, tp_rank_id, expert_shard_type,
                   shared_expert_num, shared_expert_rank_num, quant_mode, global_bs, expert_token_nums_type, comm_alg,
                   zero_expert_num, copy_expert_num, const_expert_num):
    s = dispatch_shapes(x.shape, expert_ids.shape, ep_world_size, ep_rank_id, moe_expert_num,
                        has_elastic_info=elastic_info is not None, tp_world_size=tp_world_size,
                        shared_expert_num=shared_expert_num, shared_expert_rank_num=shared_expert_rank_num,
                        global_bs=global_bs)
    return (
        x.new_empty(s.expand_x, dtype=torch.int8 if quant_mode == 2 else x.dtype),
        x.new_empty(s.dynamic_scales, dtype=torch.float32),
        x.new_empty(s.assist_info_for_combine, dtype=torch.int32),
        x.new_empty(s.expert_token_nums, dtype=torch.int64),
        x.new_empty(s.ep_recv_counts, dtype=torch.int32),
        x.new_empty(s.tp_recv_counts, dtype=torch.int32),
        x.new_empty(s.expand_scales, dtype=torch.float32),
    )


@_operator("npu_moe_distribute_combine_v2")  # see dispatch_v2
def _combine_op(expand_x: Tensor, expert_ids: Tensor, assist_info_for_combine: Tensor, ep_send_counts: Tensor,
                expert_scales: Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int,
                tp_send_counts: Optional[Tensor], x_active_mask: Optional[Tensor], expand_scales: Optional[Tensor],
                shared_expert_x: Optional[Tensor], elastic_info: Optional[Tensor], ori_x: Optional[Tensor],
                const_expert_alpha_1: Optional[Tensor], const_expert_alpha_2: Optional[Tensor],
                const_expert_v: Optional[Tensor], performance_info: Optional[Tensor], group_tp: str,
                tp_world_size: int, tp_rank_id: int,
                expert_shard_type: int, shared_expert_num: int, shared_expert_rank_num: int, global_bs: int,
                comm_quant_mode: int, comm_alg: str, zero_expert_num: int, copy_expert_num: int,
                const_expert_num: int) -> Tensor:
    out = None if performance_info is not None else _combine_eager(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep,
                         ep_world_size, ep_rank_id, moe_expert_num, tp_send_counts, x_active_mask, expand_scales,
                         shared_expert_x, elastic_info, ori_x, const_expert_alpha_1, const_expert_alpha_2,
                         const_expert_v, group_tp, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
                         shared_expert_rank_num, global_bs, comm_quant_mode, comm_alg, zero_expert_num,
                         copy_expert_num, const_expert_num)
    if out is not None:
        return out
    try:
        args = _combine_kwargs(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep,
                               ep_world_size, ep_rank_id, moe_expert_num, tp_send_counts, x_active_mask, expand_scales,
                               shared_expert_x, elastic_info, ori_x, const_expert_alpha_1, const_expert_alpha_2,
                               const_expert_v, performance_info, group_tp, tp_world_size, tp_rank_id, expert_shard_type,
                               shared_expert_num, shared_expert_rank_num, global_bs, comm_quant_mode, comm_alg,
                               zero_expert_num, copy_expert_num, const_expert_num)
    except Exception as e:
        _reject(_COMBINE, e, _group_fields(group_ep, ep_world_size, ep_rank_id, elastic_info, group_tp, tp_world_size,
                                           tp_rank_id))
        raise
    return from_capsule(_C.combine_v2(args))


@_fake("npu_moe_distribute_combine_v2")
def _combine_fake(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, *args):
    return expand_x.new_empty(combine_shape(expand_x.shape, expert_ids.shape))


# ---- the public functions: torch_npu's signatures ----

def npu_moe_distribute_dispatch_v2(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *,
                                   scales=None, x_active_mask=None, expert_scales=None, elastic_info=None,
                                   performance_info=None, group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                                   shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0, global_bs=0,
                                   expert_token_nums_type=1, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                   const_expert_num=0):
    """Sends every token to the ranks of its top-k experts (and to the shared-expert ranks).

    A collective over the EP group ``group_ep`` (and the TP group ``group_tp`` when tp_world_size == 2):
    every active rank calls it. group_ep / group_tp: a name from :func:`moedist.get_comm_name`, or the
    torch.distributed ProcessGroup itself (resolved through get_comm_name before the operator runs).
    Only the first rows of expand_x are written: sum(expert_token_nums) with expert_token_nums_type 1
    (its last entry with type 0): this rank's own rows, ep_recv_counts[W*L - 1] (W - 1 on a shared-expert
    rank), then with tp_world_size 2 the TP peer's rows.
    Returns (expand_x, dynamic_scales, assist_info_for_combine, expert_token_nums, ep_recv_counts,
    tp_recv_counts, expand_scales), as torch_npu.npu_moe_distribute_dispatch_v2 does. Rows of expand_x past
    the received count, and assist_info_for_combine past 3 * own rows, are unspecified.
    Raises ValueError for invalid arguments (naming the parameter), NotImplementedError for what is not
    supported, RuntimeError when the communication fails (a peer rejected its call, died or timed out),
    KeyboardInterrupt on Ctrl-C while waiting for peers (they then fail at once, naming this rank). A call
    this rank rejects, in Python or in C++, makes its peers fail at once naming it.
    """
    if type(group_ep) is not str or type(group_tp) is not str:
        group_ep, group_tp = _resolve_groups(_DISPATCH, group_ep, group_tp, ep_world_size, ep_rank_id, elastic_info,
                                             tp_world_size, tp_rank_id)
    if not _is_compiling() and _plain_eager():
        out = None if performance_info is not None else _dispatch_eager(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales, x_active_mask,
                              expert_scales, elastic_info, group_tp, tp_world_size, tp_rank_id, expert_shard_type,
                              shared_expert_num, shared_expert_rank_num, quant_mode, global_bs, expert_token_nums_type,
                              comm_alg, zero_expert_num, copy_expert_num, const_expert_num)
        if out is not None:
            return out
    _checked(_DISPATCH, dict(x=x, expert_ids=expert_ids, group_ep=group_ep, ep_world_size=ep_world_size,
                             ep_rank_id=ep_rank_id, moe_expert_num=moe_expert_num, scales=scales,
                             x_active_mask=x_active_mask, expert_scales=expert_scales, elastic_info=elastic_info,
                             performance_info=performance_info, group_tp=group_tp, tp_world_size=tp_world_size, tp_rank_id=tp_rank_id,
                             expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                             shared_expert_rank_num=shared_expert_rank_num, quant_mode=quant_mode, global_bs=global_bs,
                             expert_token_nums_type=expert_token_nums_type, comm_alg=comm_alg,
                             zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num,
                             const_expert_num=const_expert_num))
    return torch.ops.moedist.npu_moe_distribute_dispatch_v2(
        x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales, x_active_mask, expert_scales,
        elastic_info, performance_info, group_tp, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
        shared_expert_rank_num, quant_mode, global_bs, expert_token_nums_type, comm_alg, zero_expert_num,
        copy_expert_num, const_expert_num)


def npu_moe_distribute_combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales,
                                  group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, tp_send_counts=None,
                                  x_active_mask=None, expand_scales=None, shared_expert_x=None, elastic_info=None,
                                  ori_x=None, const_expert_alpha_1=None, const_expert_alpha_2=None,
                                  const_expert_v=None, performance_info=None, group_tp="", tp_world_size=0, tp_rank_id=0,
                                  expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, global_bs=0,
                                  comm_quant_mode=0, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                  const_expert_num=0):
    """Brings the expert outputs back along dispatch's paths and sums them with the gating weights.

    expand_x needs only the rows dispatch produced (the own rows, ep_send_counts[W*L - 1], plus the TP
    peer's with tp_world_size 2): a (rows, H) tensor of the expert outputs is enough; rows past them are not read.
    group_ep / group_tp: a name or a ProcessGroup, as for dispatch.
    Returns (BS, H) in expand_x's dtype; rows of inactive tokens (x_active_mask) are zeros. Errors as for
    :func:`npu_moe_distribute_dispatch_v2`.
    """
    if type(group_ep) is not str or type(group_tp) is not str:
        group_ep, group_tp = _resolve_groups(_COMBINE, group_ep, group_tp, ep_world_size, ep_rank_id, elastic_info,
                                             tp_world_size, tp_rank_id)
    if not _is_compiling() and _plain_eager():
        out = None if performance_info is not None else _combine_eager(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep,
                             ep_world_size, ep_rank_id, moe_expert_num, tp_send_counts, x_active_mask, expand_scales,
                             shared_expert_x, elastic_info, ori_x, const_expert_alpha_1, const_expert_alpha_2,
                             const_expert_v, group_tp, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
                             shared_expert_rank_num, global_bs, comm_quant_mode, comm_alg, zero_expert_num,
                             copy_expert_num, const_expert_num)
        if out is not None:
            return out
    _checked(_COMBINE, dict(expand_x=expand_x, expert_ids=expert_ids, assist_info_for_combine=assist_info_for_combine,
                            ep_send_counts=ep_send_counts, expert_scales=expert_scales, group_ep=group_ep,
                            ep_world_size=ep_world_size, ep_rank_id=ep_rank_id, moe_expert_num=moe_expert_num,
                            tp_send_counts=tp_send_counts, x_active_mask=x_active_mask, expand_scales=expand_scales,
                            shared_expert_x=shared_expert_x, elastic_info=elastic_info, ori_x=ori_x,
                            const_expert_alpha_1=const_expert_alpha_1, const_expert_alpha_2=const_expert_alpha_2,
                            const_expert_v=const_expert_v, performance_info=performance_info, group_tp=group_tp, tp_world_size=tp_world_size,
                            tp_rank_id=tp_rank_id, expert_shard_type=expert_shard_type,
                            shared_expert_num=shared_expert_num, shared_expert_rank_num=shared_expert_rank_num,
                            global_bs=global_bs, comm_quant_mode=comm_quant_mode, comm_alg=comm_alg,
                            zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num,
                            const_expert_num=const_expert_num))
    return torch.ops.moedist.npu_moe_distribute_combine_v2(
        expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep, ep_world_size,
        ep_rank_id, moe_expert_num, tp_send_counts, x_active_mask, expand_scales, shared_expert_x, elastic_info,
        ori_x, const_expert_alpha_1, const_expert_alpha_2, const_expert_v, performance_info, group_tp, tp_world_size,
        tp_rank_id, expert_shard_type, shared_expert_num, shared_expert_rank_num, global_bs, comm_quant_mode, comm_alg,
        zero_expert_num, copy_expert_num, const_expert_num)


# ---- combine + residual add + RMSNorm ----

_ADD_RMS_NORM = "npu_moe_distribute_combine_add_rms_norm"


def _check_reserved(activation_scale, weight_scale, group_list, out_dtype, group_list_type):
    op = _ADD_RMS_NORM
    for name, v in (("activation_scale", activation_scale), ("weight_scale", weight_scale), ("group_list", group_list)):
        if v is not None:
            raise _C.InvalidArgument(f"{op}: {name} is a reserved parameter (must be None)")
    for name, v in (("out_dtype", out_dtype), ("group_list_type", group_list_type)):
        if v != 0:
            raise _C.InvalidArgument(f"{op}: {name}={v} is a reserved parameter (must be 0)")


@_operator("npu_moe_distribute_combine_add_rms_norm")  # see dispatch_v2
def _add_rms_norm_op(expand_x: Tensor, expert_ids: Tensor, expand_idx: Tensor, ep_send_counts: Tensor,
                     expert_scales: Tensor, residual_x: Tensor, gamma: Tensor, group_ep: str, ep_world_size: int,
                     ep_rank_id: int, moe_expert_num: int, tp_send_counts: Optional[Tensor],
                     x_active_mask: Optional[Tensor], activation_scale: Optional[Tensor],
                     weight_scale: Optional[Tensor], group_list: Optional[Tensor], expand_scales: Optional[Tensor],
                     shared_expert_x: Optional[Tensor], elastic_info: Optional[Tensor], ori_x: Optional[Tensor],
                     const_expert_alpha_1: Optional[Tensor], const_expert_alpha_2: Optional[Tensor],
                     const_expert_v: Optional[Tensor], performance_info: Optional[Tensor], group_tp: str,
                     tp_world_size: int, tp_rank_id: int, expert_shard_type: int, shared_expert_num: int, shared_expert_rank_num: int, global_bs: int,
                     out_dtype: int, comm_quant_mode: int, group_list_type: int, norm_eps: float,
                     zero_expert_num: int, copy_expert_num: int, const_expert_num: int
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    _check_reserved(activation_scale, weight_scale, group_list, out_dtype, group_list_type)
    try:
        args = _combine_kwargs(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, group_ep,
                               ep_world_size, ep_rank_id, moe_expert_num, tp_send_counts, x_active_mask, expand_scales,
                               shared_expert_x, elastic_info, ori_x, const_expert_alpha_1, const_expert_alpha_2,
                               const_expert_v, performance_info, group_tp, tp_world_size, tp_rank_id,
                               expert_shard_type, shared_expert_num, shared_expert_rank_num, global_bs,
                               comm_quant_mode, "", zero_expert_num, copy_expert_num, const_expert_num)
    except Exception as e:
        _reject(_COMBINE, e, _group_fields(group_ep, ep_world_size, ep_rank_id, elastic_info, group_tp, tp_world_size,
                                           tp_rank_id))
        raise
    op = _ADD_RMS_NORM
    out = _C.combine_add_rms_norm(args, view(residual_x, "residual_x", op), view(gamma, "gamma", op), float(norm_eps))
    return tuple(from_capsule(c) for c in out)


@_fake("npu_moe_distribute_combine_add_rms_norm")
def _add_rms_norm_fake(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, residual_x, gamma, *args):
    bs, h = expert_ids.shape[0], expand_x.shape[1]
    return (expand_x.new_empty((bs, 1, h)), expand_x.new_empty((bs, 1, 1), dtype=torch.float32),
            expand_x.new_empty((bs, 1, h)))


def npu_moe_distribute_combine_add_rms_norm(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales,
                                            residual_x, gamma, group_ep, ep_world_size, ep_rank_id, moe_expert_num,
                                            *, tp_send_counts=None, x_active_mask=None, activation_scale=None,
                                            weight_scale=None, group_list=None, expand_scales=None,
                                            shared_expert_x=None, elastic_info=None, ori_x=None,
                                            const_expert_alpha_1=None, const_expert_alpha_2=None,
                                            const_expert_v=None, performance_info=None, group_tp="", tp_world_size=0, tp_rank_id=0,
                                            expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0,
                                            global_bs=0, out_dtype=0, comm_quant_mode=0, group_list_type=0,
                                            norm_eps=1e-06, zero_expert_num=0, copy_expert_num=0,
                                            const_expert_num=0):
    """combine_v2, then x = combined + residual_x and y = RMSNorm(x) * gamma, in one collective call.

    expand_idx is dispatch_v2's assist_info_for_combine. residual_x: (BS, 1, H) (or (BS, H)) and gamma: (H,),
    both in expand_x's dtype. Returns (y, rstd, x): y and x (BS, 1, H) in expand_x's dtype, rstd (BS, 1, 1)
    float32; the rounding order is in docs/semantics.md. activation_scale, weight_scale, group_list,
    out_dtype and group_list_type are reserved (must keep their defaults). Errors as combine_v2's.
    """
    return torch.ops.moedist.npu_moe_distribute_combine_add_rms_norm(
        expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, residual_x, gamma, group_ep, ep_world_size,
        ep_rank_id, moe_expert_num, tp_send_counts, x_active_mask, activation_scale, weight_scale, group_list,
        expand_scales, shared_expert_x, elastic_info, ori_x, const_expert_alpha_1, const_expert_alpha_2,
        const_expert_v, performance_info, group_tp, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
        shared_expert_rank_num, global_bs, out_dtype, comm_quant_mode, group_list_type, float(norm_eps),
        zero_expert_num, copy_expert_num, const_expert_num)


# ---- split phase: setup sends and returns, teardown receives and finishes ----

class SplitHandle:
    """What dispatch_setup / combine_setup return: teardown's ticket. Keeps the input tensors alive until
    the teardown (the combine reduction reads some of them there). Used once."""

    def __init__(self, kind: str, handle: int, keep: tuple):
        self.kind, self.handle, self._keep = kind, handle, keep

    def __repr__(self):
        return f"SplitHandle({self.kind}, {self.handle}, {'open' if self._keep is not None else 'used'})"


def _take(h, kind: str) -> int:
    if not isinstance(h, SplitHandle) or h.kind != kind:
        raise TypeError(f"{kind}_teardown: expected the SplitHandle that {kind}_setup returned, got {h!r}")
    if h._keep is None:
        raise _C.InvalidArgument(f"{kind}_teardown: {h!r} was already torn down")
    return h.handle


def dispatch_setup(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, **kwargs) -> SplitHandle:
    """The first half of npu_moe_distribute_dispatch_v2 (same arguments): validates, sends this rank's rows
    and returns; dispatch_teardown(handle) waits for the peers' rows and returns dispatch_v2's 7 outputs.
    Collective; one open setup per EP group at a time. The exchange is split with comm_alg fullmesh and no
    TP; otherwise setup runs the whole op. Eager only (not a torch.compile operator)."""
    bound = inspect.signature(npu_moe_distribute_dispatch_v2).bind(x, expert_ids, group_ep, ep_world_size, ep_rank_id,
                                                                 moe_expert_num, **kwargs)
    bound.apply_defaults()
    args = _dispatch_kwargs(**bound.arguments)
    keep = tuple(v for v in bound.arguments.values() if isinstance(v, Tensor))
    return SplitHandle("dispatch", _C.dispatch_setup(args), keep)


def dispatch_teardown(handle: SplitHandle):
    out = _C.dispatch_teardown(_take(handle, "dispatch"))
    handle._keep = None
    return tuple(from_capsule(c) for c in out)


def combine_setup(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep,
                  ep_world_size, ep_rank_id, moe_expert_num, **kwargs) -> SplitHandle:
    """The first half of npu_moe_distribute_combine_v2 (same arguments): sends this rank's expert outputs
    and returns; combine_teardown(handle) waits for the peers' and returns combine_v2's (BS, H) output."""
    bound = inspect.signature(npu_moe_distribute_combine_v2).bind(
        expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep, ep_world_size,
        ep_rank_id, moe_expert_num, **kwargs)
    bound.apply_defaults()
    args = _combine_kwargs(**bound.arguments)
    keep = tuple(v for v in bound.arguments.values() if isinstance(v, Tensor))
    return SplitHandle("combine", _C.combine_setup(args), keep)


def combine_teardown(handle: SplitHandle):
    out = _C.combine_teardown(_take(handle, "combine"))
    handle._keep = None
    return from_capsule(out)
