#!/usr/bin/env python3
"""Per-call cost of the Python package on a 1-rank shared-memory group (no peer to wait for).

Times, per call (median and p10 over --iters calls, after --warmup), each path in turn, --rounds times
over (so that a change in the machine's speed during the run hits every path alike):
  C++          the C++ op alone, called --iters / --rounds times in a row from C++ on the arguments the
               eager path read (moedist._C.dispatch_v2_timed / combine_v2_timed)
  eager        moedist.npu_moe_distribute_dispatch_v2 / _combine_v2 (the eager path: straight to C++)
  operator     torch.ops.moedist.* called directly (the torch.library operator, as a compiled graph calls it)
  layer eager  a function dispatch -> expert (2 * expand_x) -> combine, called as it is
  layer compiled  the same function under torch.compile(fullgraph=True, backend=--backend)
and prints them as one JSON object, with eager minus C++ per op: what Python adds per call.
    python bench/python_calls.py --tokens 8 --hidden 7168 --experts 16 --topk 8 [--backend inductor]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def call_ns(fn, n: int) -> list:
    v = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        v.append(time.perf_counter_ns() - t0)
    return v


def summary(v: list) -> dict:
    v = sorted(v)
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
    p.add_argument("--iters", type=int, default=4000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--rounds", type=int, default=8)
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
    dargs = operator_args(D, OD, x, ids, name, 1, 0, E)
    cargs = operator_args(C, OC, expert_out, ids, d[2], d[4], w, name, 1, 0, E)
    # the eager entry points take the operator's arguments less performance_info (None here)
    deager = [v for v, arg in zip(dargs, OD.default._schema.arguments) if arg.name != "performance_info"]
    ceager = [v for v, arg in zip(cargs, OC.default._schema.arguments) if arg.name != "performance_info"]

    def layer(x, ids, w):
        r = D(x, ids, name, 1, 0, E)
        return C(r[0] * 2, ids, r[2], r[4], w, name, 1, 0, E)

    per = max(1, a.iters // a.rounds)
    paths = {
        "dispatch_cpp": lambda n: moedist._C.dispatch_v2_timed(n, *deager),
        "dispatch_eager": lambda n: call_ns(lambda: D(x, ids, name, 1, 0, E), n),
        "dispatch_operator": lambda n: call_ns(lambda: OD(*dargs), n),
        "combine_cpp": lambda n: moedist._C.combine_v2_timed(n, *ceager),
        "combine_eager": lambda n: call_ns(lambda: C(expert_out, ids, d[2], d[4], w, name, 1, 0, E), n),
        "combine_operator": lambda n: call_ns(lambda: OC(*cargs), n),
        "layer_eager": lambda n: call_ns(lambda: layer(x, ids, w), n),
    }
    if a.backend != "none":
        compiled = torch.compile(layer, fullgraph=True, backend=a.backend)
        assert torch.equal(compiled(x, ids, w), layer(x, ids, w)), "compiled result differs from eager"
        paths[f"layer_compiled_{a.backend}"] = lambda n: call_ns(lambda: compiled(x, ids, w), n)
    for run in paths.values():
        run(a.warmup)
    times = {k: [] for k in paths}
    for _ in range(a.rounds):
        for k, run in paths.items():
            times[k] += run(per)
    res = {"tokens": BS, "hidden": H, "experts": E, "topk": K, "torch": torch.__version__}
    for k, v in times.items():
        res[f"{k}_us"] = summary(v)
    for op in ("dispatch", "combine"):
        res[f"{op}_added_us"] = round(res[f"{op}_eager_us"]["median"] - res[f"{op}_cpp_us"]["median"], 2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
