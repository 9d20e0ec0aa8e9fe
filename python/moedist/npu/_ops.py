"""torch_npu's MoE operators as torch.ops.npu.* (the names torch_npu registers) over moedist's ops.

Each torch.ops.npu operator has torch_npu's schema (argument names, order, keyword-only marker, defaults)
and a CompositeImplicitAutograd kernel that calls the moedist operator (torch.ops.moedist.*): eager calls
run moedist's C++ core; under torch.compile the npu op decomposes into the moedist op, whose fake
implementation gives the output shapes. torch_npu.<name> is the same operator, as in torch_npu.
"""
from __future__ import annotations

import inspect

import torch

from .. import _ops as _md_ops

_STR = {"group_ep", "group_tp", "comm_alg"}
_FLOAT = {"norm_eps"}
# The op adds into performance_info in place; not declared mutated in the schema, as moedist's own ops
# (see moedist/_ops.py: inductor cannot lower an op with an optional mutable argument).
_MUTATED: set = set()
_installed = False
_lib = None


def _schema(name: str, fn, returns: str) -> str:
    parts, kw_only = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not kw_only:
            parts.append("*")
            kw_only = True
        if p.name in _STR:
            typ = "str"
        elif p.name in _FLOAT:
            typ = "float"
        elif p.default is inspect.Parameter.empty:
            typ = "int" if p.name in ("ep_world_size", "ep_rank_id", "moe_expert_num") else "Tensor"
        elif p.name in _MUTATED:
            typ = "Tensor(a!)?"
        elif p.default is None:
            typ = "Tensor?"
        else:
            typ = "int"
        if p.default is inspect.Parameter.empty:
            parts.append(f"{typ} {p.name}")
        elif p.default is None:
            parts.append(f"{typ} {p.name}=None")
        elif isinstance(p.default, str):
            parts.append(f'{typ} {p.name}="{p.default}"')
        else:
            parts.append(f"{typ} {p.name}={p.default!r}")
    return f"{name}({', '.join(parts)}) -> {returns}"


def operators() -> dict:
    """name -> (moedist function, schema return type)."""
    ops = {
        "npu_moe_distribute_dispatch_v2": (_md_ops.npu_moe_distribute_dispatch_v2,
                                           "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
        "npu_moe_distribute_combine_v2": (_md_ops.npu_moe_distribute_combine_v2, "Tensor"),
    }
    for name, ret in (("npu_moe_distribute_combine_add_rms_norm", "(Tensor, Tensor, Tensor)"),):
        fn = getattr(_md_ops, name, None)
        if fn is not None:
            ops[name] = (fn, ret)
    return ops


def install() -> None:
    global _installed, _lib
    if _installed:
        return
    _lib = torch.library.Library("npu", "FRAGMENT")
    for name, (fn, ret) in operators().items():
        _lib.define(_schema(name, fn, ret))

        def kernel(*args, __fn=fn, **kwargs):
            return __fn(*args, **kwargs)

        _lib.impl(name, kernel, "CompositeImplicitAutograd")
    _installed = True
