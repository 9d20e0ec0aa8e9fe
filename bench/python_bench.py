#!/usr/bin/env python3
"""The Python side of `moedist bench --python`: the bench's configurations through the Python package.

`moedist bench --python` runs this script once per rank count, right after the C++ workers of that
rank count, with the same options; it starts the ranks as processes of this host (a gloo process group,
moedist.get_comm_name over it: moedist's shared-memory communicator) and times, per configuration and
comm_alg, what the C++ worker times: moedist.npu_moe_distribute_dispatch_v2, then
moedist.npu_moe_distribute_combine_v2 of a fixed bf16 buffer of the dispatched rows, with a barrier
before each iteration (sync() in worker); per iteration the maximum over ranks. The inputs are drawn as
the C++ worker draws them (random normal rows, K distinct experts per token, weights 1/K) from torch's generator.

Rank 0 prints one line per configuration:
    PYROW <ranks> <tokens> <hidden> <experts> <quant_mode> <comm_quant_mode> <comm_alg> {"dispatch_us": ...}
Run it directly:  python bench/python_bench.py --ranks 2 --tokens 8 --hidden 7168 --experts 16 --quant 0
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _ints(s: str):
    return [int(v) for v in s.split(",") if v]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--tokens", type=_ints, default=[1, 8, 32, 128, 512])
    p.add_argument("--hidden", type=_ints, default=[7168])
    p.add_argument("--experts", type=_ints, default=[16, 64])
    p.add_argument("--quant", type=_ints, default=[0, 2])
    p.add_argument("--comm-quant", type=_ints, default=[0])
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--comm-alg", default="fullmesh")
    p.add_argument("--ranks-per-host", type=int, default=0)
    p.add_argument("--transport", default="shm")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds the whole run may take")
    p.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--init-file", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def stats(v):
    """median, p10, p90 as the C++ bench takes them (nearest rank)."""
    v = sorted(v)
    q = lambda f: v[min(len(v) - 1, int(f * (len(v) - 1) + 0.5))]  # noqa: E731
    return {"median": round(q(0.5) * 1e6, 2), "p10": round(q(0.1) * 1e6, 2), "p90": round(q(0.9) * 1e6, 2)}


def worker(a) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    import moedist

    torch.set_num_threads(1)
    rank, W = a.worker, a.ranks
    dist.init_process_group("gloo", init_method=f"file://{a.init_file}", rank=rank, world_size=W)
    name = moedist.get_comm_name(ranks_per_server=a.ranks_per_host)
    D, C = moedist.npu_moe_distribute_dispatch_v2, moedist.npu_moe_distribute_combine_v2
    K = a.topk

    def sync(x0, ids0, E):
        """The barrier before each timed iteration: a dispatch of no tokens over the same communicator
        (the ranks leave it within microseconds of each other, as they leave the C++ worker's
        MPI_Barrier). Not gloo's barrier: it runs on helper threads (gloo_tcp_loop, pt_gloo_runloop)
        that took a quarter of the CPU time in a profile of the 2-rank, 8-token run, and with it the
        median dispatch of that run was 262-272 us against 134 us with this barrier (docs/perf.md)."""
        D(x0, ids0, name, W, rank, E)
    for H in a.hidden:
        for E in a.experts:
            for q in a.quant:
                for BS in a.tokens:
                    if E % W != 0 or K > E:
                        continue
                    g = torch.Generator().manual_seed(1000 + rank * 7 + BS * 13 + E)
                    x = torch.randn(BS, H, generator=g).to(torch.bfloat16)
                    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(BS)]).to(torch.int32) \
                        if BS else torch.empty(0, K, dtype=torch.int32)
                    w = torch.full((BS, K), 1.0 / K, dtype=torch.float32)
                    for alg, cq in [(alg, cq) for alg in a.comm_alg.split(",") for cq in a.comm_quant]:
                        if cq == 2 and alg == "hierarchy":
                            continue  # hierarchy refuses comm_quant_mode 2 (the C++ worker skips it too)
                        hier = alg == "hierarchy"
                        dkw = dict(quant_mode=q, comm_alg=alg, expert_scales=w if hier else None)
                        r = D(x, ids, name, W, rank, E, **dkw)
                        # the experts' output: token-like values (comm_quant_mode 2 quantizes them)
                        expert_out = torch.randn(r[0].shape[0], H, generator=g).to(torch.bfloat16)
                        td, tc = [], []
                        dist.barrier()
                        for it in range(a.warmup + a.iters):
                            sync(x[:0], ids[:0], E)
                            t0 = time.perf_counter()
                            r = D(x, ids, name, W, rank, E, **dkw)
                            t1 = time.perf_counter()
                            C(expert_out, ids, r[2], r[4], w, name, W, rank, E, comm_alg=alg, comm_quant_mode=cq,
                              expand_scales=r[6] if hier else None)
                            t2 = time.perf_counter()
                            if it >= a.warmup:
                                td.append(t1 - t0)
                                tc.append(t2 - t1)
                        t = torch.tensor([td, tc], dtype=torch.float64)
                        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # per iteration, the slowest rank
                        if rank == 0:
                            d, c = t[0].tolist(), t[1].tolist()
                            entry = {"dispatch_us": stats(d), "combine_us": stats(c),
                                     "round_us": stats([u + v for u, v in zip(d, c)]),
                                     "interpreter": sys.executable, "torch": torch.__version__}
                            print(f"PYROW {W} {BS} {H} {E} {q} {cq} {alg} {json.dumps(entry, separators=(',', ':'))}",
                                  flush=True)
    dist.barrier()
    moedist.destroy_comm(name)
    dist.destroy_process_group()
    return 0


def main(argv) -> int:
    a = parse(argv)
    if a.worker >= 0:
        return worker(a)
    if a.transport != "shm":
        print(f"python_bench: --transport {a.transport}: the Python package's communicators are shared memory only",
              file=sys.stderr)
        return 3
    fd, init_file = tempfile.mkstemp(prefix="moedist-pybench-")
    os.close(fd)
    os.unlink(init_file)  # gloo's FileStore creates it
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--worker", str(r), "--init-file",
                               init_file], stdout=None if r == 0 else subprocess.DEVNULL, env=env)
             for r in range(a.ranks)]
    deadline = time.monotonic() + a.timeout
    rc = 0
    try:
        while rc == 0 and any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                print(f"python_bench: the ranks took longer than --timeout {a.timeout:.0f} s", file=sys.stderr)
                rc = 1
            time.sleep(0.05)
            rc = rc or next((p.returncode for p in procs if p.returncode), 0)  # a failed rank: stop the others
        rc = rc or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            os.unlink(init_file)
        except OSError:
            pass
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
