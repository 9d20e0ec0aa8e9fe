#!/usr/bin/env python3
"""Per-call cost of the Python package on a 1-rank shared-memory group (no peer to wait for).

Times, per call (median and p10 of --iters calls, after --warmup):
  eager        moedist.npu_moe_distribute_dispatch_v2 / _combine_v2 (the eager path: straight to C++)
  operator     torch.ops.moedist.* called directly (the torch.library operator, as a compiled graph calls it)
  layer eager  a function dispatch -> expert (2 * expand_x) -> combine, called as it is
  layer compiled  the same function under torch.compile(fullgraph=True, backend=--backend)
The C++ op's own time for the same configuration is what `moedist bench --ranks 1` reports; the
difference is what Python adds per call.
    python bench/python_calls.py --tokens 8 --hidden 7168 --experts 16 --topk 8 [--backend inductor]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def timed(fn, iters: int, warmup: int):
    for _ in range(warmup):
        fn()
    v = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        v.append(time.perf_counter_ns() - t0)
    v.sort()
    return {"median": round(v[len(v) // 2] / 1e3, 2), "p10": round(v[len(v) // 10] / 1e3, 2)}


def operator_args(fn, op, *args) -> list:
    """The operator's arguments in schema order: `args` and the public function's defaults for the rest
    (the operator's schema names its arguments as the public function does and has no defaults)."""
    import inspect

    bound = inspect.signature(fn).bind(*args)
    bound.apply_defaults()
    return [bound.arguments[arg.name] for arg in op.default._schema.arguments]


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--backend", default="aot_eager", help="torch.compile backend (aot_eager, inductor); none: skip")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    import moedist

    torch.set_num_threads(1)
    BS, H, K, E = a.tokens, a.hidden, a.topk, a.experts
    import uuid

    name = "python_calls"
    moedist._C.init_shm_group(name, 1, 0, uuid.uuid4().hex[:16], 0, 0)  # the transport `moedist bench` times
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BS, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(BS)]).to(torch.int32)
    w = torch.full((BS, K), 1.0 / K)
    D, C = moedist.npu_moe_distribute_dispatch_v2, moedist.npu_moe_distribute_combine_v2
    OD, OC = torch.ops.moedist.npu_moe_distribute_dispatch_v2, torch.ops.moedist.npu_moe_distribute_combine_v2
    d = D(x, ids, name, 1, 0, E)
    expert_out = torch.zeros(d[0].shape[0], H, dtype=torch.bfloat16)
    res = {"tokens": BS, "hidden": H, "experts": E, "topk": K, "torch": torch.__version__}
    res["dispatch_eager_us"] = timed(lambda: D(x, ids, name, 1, 0, E), a.iters, a.warmup)
    dargs = operator_args(D, OD, x, ids, name, 1, 0, E)
    res["dispatch_operator_us"] = timed(lambda: OD(*dargs), a.iters, a.warmup)
    res["combine_eager_us"] = timed(lambda: C(expert_out, ids, d[2], d[4], w, name, 1, 0, E), a.iters, a.warmup)
    cargs = operator_args(C, OC, expert_out, ids, d[2], d[4], w, name, 1, 0, E)
    res["combine_operator_us"] = timed(lambda: OC(*cargs), a.iters, a.warmup)

    def layer(x, ids, w):
        r = D(x, ids, name, 1, 0, E)
        return C(r[0] * 2, ids, r[2], r[4], w, name, 1, 0, E)

    res["layer_eager_us"] = timed(lambda: layer(x, ids, w), a.iters, a.warmup)
    if a.backend != "none":
        compiled = torch.compile(layer, fullgraph=True, backend=a.backend)
        assert torch.equal(compiled(x, ids, w), layer(x, ids, w)), "compiled result differs from eager"
        res[f"layer_compiled_{a.backend}_us"] = timed(lambda: compiled(x, ids, w), a.iters, a.warmup)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
