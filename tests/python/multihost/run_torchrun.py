"""The program every rank runs under torchrun in the multi-host test (scripts/torchrun-netns-test.sh).

    python -m torch.distributed.run --nnodes N --node_rank I --nproc_per_node P ... run_torchrun.py [options]

Every rank joins a gloo process group (torchrun's environment), takes moedist's communicator over the
whole group with moedist.get_comm_name(dist.group.WORLD), checks what the communicator reports (world size, rank, the servers of comm_alg "hierarchy" are the
hosts when there are several) and then runs dispatch_v2 + combine_v2 for every configuration of
CONFIGS: fullmesh and hierarchy, bf16 and fp16, quant_mode 0 and 2, comm_quant_mode 2, shared-expert
ranks, x_active_mask, elastic_info, 0 to 64 tokens, H 7168 and 256, about 16 or 32 experts, K 8.

Inputs are seeded by (configuration, global rank) (tests/python/_scenarios.py), so every rank builds
every rank's call, runs moedist's reference of the whole step and compares its own outputs bit for bit.
Each rank prints one line per configuration, "[rank R] PASS name ..." or "[rank R] FAIL name: why",
then "[rank R] ALL PASS (n configurations)" or "[rank R] FAILED (k of n configurations)", and exits
1 on any failure (torchrun then fails too).

--expect-hosts N: the ranks must report N different host names (socket.gethostname()), the ranks of one
torchrun node the same one: the test's hosts really are separate (scripts/torchrun-netns-test.sh gives
each its own UTS namespace). --ranks-per-server P runs the hierarchy configurations again on a second
communicator made with ranks_per_server=P (servers of P ranks, also on one host). --only REGEX runs the
configurations whose name matches (at least one must).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/python

import moedist  # noqa: E402
import _scenarios as sc  # noqa: E402

K = 8

# name -> configuration overrides of _scenarios.DEFAULTS (E_target: the expert count is the multiple of the
# MoE ranks nearest above it; Sr "auto": shared-expert ranks, about a third of the ranks).
CONFIGS = {
    "fullmesh-bf16-q0-bs8-h7168": dict(comm_alg="fullmesh", BS=8, H=7168, E_target=16),
    "fullmesh-bf16-q0-bs0-h256": dict(comm_alg="fullmesh", BS=0, H=256, E_target=16),
    "fullmesh-bf16-q0-bs1-h256-e32": dict(comm_alg="fullmesh", BS=1, H=256, E_target=32),
    "fullmesh-bf16-q0-bs64-h7168-e32": dict(comm_alg="fullmesh", BS=64, H=7168, E_target=32),
    "fullmesh-fp16-q0-bs64-h256": dict(comm_alg="fullmesh", dtype="fp16", BS=64, H=256, E_target=16),
    "fullmesh-bf16-q2-bs64-h256-e32": dict(comm_alg="fullmesh", quant=2, BS=64, H=256, E_target=32),
    "fullmesh-fp16-q2-smooth-bs8-h7168": dict(comm_alg="fullmesh", dtype="fp16", quant=2, smooth=True, BS=8, H=7168,
                                              E_target=16),
    "fullmesh-bf16-commquant2-bs8-h7168": dict(comm_alg="fullmesh", comm_quant=2, BS=8, H=7168, E_target=16),
    "fullmesh-fp16-q2-commquant2-bs64-h256": dict(comm_alg="fullmesh", dtype="fp16", quant=2, comm_quant=2, BS=64,
                                                  H=256, E_target=32),
    "fullmesh-bf16-shared-q2-bs8-h256": dict(comm_alg="fullmesh", Sr="auto", quant=2, BS=8, H=256, E_target=16),
    "fullmesh-bf16-mask1d-bs8-h7168": dict(comm_alg="fullmesh", mask="1d", BS=8, H=7168, E_target=16),
    "fullmesh-fp16-mask2d-shared-bs64-h256": dict(comm_alg="fullmesh", dtype="fp16", mask="2d", Sr="auto", BS=64,
                                                  H=256, E_target=32),
    "fullmesh-bf16-elastic-bs8-h256": dict(comm_alg="fullmesh", removed="last", BS=8, H=256, E_target=16),
    "fullmesh_v2-bf16-q0-bs8-h256": dict(comm_alg="fullmesh_v2", BS=8, H=256, E_target=16),
    "hierarchy-bf16-q0-bs8-h7168": dict(comm_alg="hierarchy", BS=8, H=7168, E_target=16),
    "hierarchy-bf16-q0-bs0-h256": dict(comm_alg="hierarchy", BS=0, H=256, E_target=16),
    "hierarchy-fp16-q0-bs1-h7168-e32": dict(comm_alg="hierarchy", dtype="fp16", BS=1, H=7168, E_target=32),
    "hierarchy-bf16-q2-bs64-h256-e32": dict(comm_alg="hierarchy", quant=2, BS=64, H=256, E_target=32),
    "hierarchy-fp16-q2-bs8-h7168": dict(comm_alg="hierarchy", dtype="fp16", quant=2, BS=8, H=7168, E_target=16),
    "hierarchy-bf16-shared-mask2d-bs8-h256": dict(comm_alg="hierarchy", Sr="auto", mask="2d", BS=8, H=256,
                                                  E_target=16),
    "hierarchy-fp16-mask1d-bs64-h256": dict(comm_alg="hierarchy", dtype="fp16", mask="1d", BS=64, H=256, E_target=16),
}


def make_config(world: int, over: dict) -> dict:
    over = dict(over)
    e_target = over.pop("E_target")
    sr = over.pop("Sr", 0)
    if sr == "auto":
        sr = max(1, world // 3) if world > 1 else 0
    removed = over.pop("removed", None)
    if removed == "last":
        removed = [world - 1] if world > 1 else None
    moe = world - sr
    E = moe * -(-e_target // moe)
    if removed:  # the removed ranks' experts are gone: K must still fit into the remaining E'
        E = max(E, moe * -(-K // (moe - len(removed))))
    return sc.make_cfg(world, K=K, E=E, Sr=sr, removed=removed, seed=zlib_seed(over), **over)


def zlib_seed(over: dict) -> int:
    import zlib

    return zlib.crc32(repr(sorted(over.items())).encode()) % 100000


def run_config(c: dict, group_ep: str, rank: int, ranks_per_server: int) -> str:
    """dispatch + expert + combine of this rank, checked against the reference of every rank's call."""
    ep_rank, _ = sc.topology(c, rank)
    c["_tp_rank"] = 0
    if ep_rank not in c["active"]:
        return "not called (removed by elastic_info)"
    rps = ranks_per_server if c["comm_alg"] == "hierarchy" else 0
    t = sc.gen_inputs(c, rank)
    kw = sc.dispatch_kwargs(c, rank, t, group_ep, "")
    # Both ops first, the checks afterwards: a rank whose dispatch is wrong still calls combine, so its
    # peers are not left waiting and the next configuration starts on a working communicator.
    d = sc.call(moedist.npu_moe_distribute_dispatch_v2, sc.DISPATCH_POSITIONAL, kw)
    y = sc.expert(c, d[0], d[1])
    out = sc.call(moedist.npu_moe_distribute_combine_v2, sc.COMBINE_POSITIONAL,
                  sc.combine_kwargs(c, rank, t, d, y, group_ep, ""))
    sc.check_fake_shapes(c, kw, d)
    callers = sc.calling_ranks(c)
    inputs = {h: sc.gen_inputs(c, h) for h in callers}
    ref_d = moedist.reference_dispatch_v2([sc.dispatch_kwargs(c, h, inputs[h], "ref_ep", "") for h in callers],
                                          ranks_per_server=rps)
    me = callers.index(rank)
    rows = sc.check_dispatch(c, d, ref_d[me], f"[rank {rank}] dispatch")
    ref_c = moedist.reference_combine_v2([
        sc.combine_kwargs(c, h, inputs[h], ref_d[i], sc.expert(c, ref_d[i][0], ref_d[i][1]), "ref_ep", "")
        for i, h in enumerate(callers)], ranks_per_server=rps)
    want_shape = (t["x"].shape[0], c["H"])
    assert tuple(out.shape) == want_shape and out.dtype == t["x"].dtype, \
        f"[rank {rank}] combine output {tuple(out.shape)} {out.dtype}, expected {want_shape} {t['x'].dtype}"
    if not torch.equal(out, ref_c[me]):
        diff = (out.float() - ref_c[me].float()).abs()
        bad = int((out != ref_c[me]).sum())
        raise AssertionError(f"[rank {rank}] combine differs from the reference in {bad} of {out.numel()} values "
                             f"(max |diff| {float(diff.max()):g})")
    return f"rows {rows}"


def check_comm(ep: str, rank: int, world: int, nnodes: int, nproc: int, expect_hosts: int) -> tuple:
    """What the communicator and the hosts report; (ranks_per_server, description). Raises on a mismatch."""
    info = moedist._C.group_info(ep, rank)
    if info["rank"] != rank or info["world_size"] != world:
        raise AssertionError(f"group_info({ep!r}) says rank {info['rank']} of {info['world_size']}, "
                             f"torchrun says rank {rank} of {world}")
    rps = int(info["ranks_per_server"])
    if nnodes > 1:
        # Several hosts: the servers of "hierarchy" are the hosts (torchrun numbers ranks host by host).
        if rps != nproc:
            raise AssertionError(f"group_info({ep!r})['ranks_per_server'] = {rps} on {nnodes} hosts of {nproc} ranks "
                                 f"(expected {nproc}: one server per host)")
        if info["transport"] == "shm":
            raise AssertionError(f"group_info({ep!r})['transport'] = 'shm' for a group spanning {nnodes} hosts")
    elif rps not in (0, world):
        raise AssertionError(f"group_info({ep!r})['ranks_per_server'] = {rps} on one host of {world} ranks "
                             f"(expected 0 or {world}: one server)")
    names = [None] * world
    dist.all_gather_object(names, (socket.gethostname(), int(os.environ.get("GROUP_RANK", "0"))))
    if expect_hosts:
        hosts = sorted({h for h, _ in names})
        if len(hosts) != expect_hosts:
            raise AssertionError(f"--expect-hosts {expect_hosts}, but the ranks report {len(hosts)} host names: {names}")
        for h in hosts:
            nodes = {n for hh, n in names if hh == h}
            if len(nodes) != 1:
                raise AssertionError(f"host {h} holds ranks of torchrun nodes {sorted(nodes)}: {names}")
    return rps, f"transport {info['transport']}, ranks_per_server {rps}, hosts {sorted({h for h, _ in names})}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--expect-hosts", type=int, default=0)
    ap.add_argument("--only", default="", help="run the configurations whose name matches this regex")
    ap.add_argument("--timeout", type=float, default=30.0, help="moedist's deadline for one wait, seconds")
    ap.add_argument("--ranks-per-server", type=int, default=0,
                    help="also run the hierarchy configurations on a second communicator (a new gloo group over "
                         "every rank) made with this ranks_per_server")
    args = ap.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nnodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
    tag = f"[rank {rank}]"

    def say(msg: str) -> None:
        sys.stdout.flush()
        os.write(1, f"{tag} {msg}\n".encode())  # one write: lines of the ranks sharing torchrun's output stay whole

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    say(f"started: {world} ranks on {nnodes} torchrun nodes x {nproc}, host {socket.gethostname()}, pid {os.getpid()}")
    try:
        ep = moedist.get_comm_name(dist.group.WORLD, timeout=args.timeout)
        rps, desc = check_comm(ep, rank, world, nnodes, nproc, args.expect_hosts)
    except Exception as e:  # noqa: BLE001
        say(f"FAIL get_comm_name: {type(e).__name__}: {e}")
        say("FAILED (the communicator)")
        return 1
    say(f"communicator {ep}: {desc}")

    runs = [(n, n, ep, rps) for n in CONFIGS if re.search(args.only, n)]
    if args.ranks_per_server:
        P = args.ranks_per_server
        try:
            ep2 = moedist.get_comm_name(dist.new_group(backend="gloo"), timeout=args.timeout, ranks_per_server=P)
            got = moedist._C.group_info(ep2, rank)["ranks_per_server"]
            if got != P:
                raise AssertionError(f"ranks_per_server={P} gave a communicator with ranks_per_server {got}")
        except Exception as e:  # noqa: BLE001
            say(f"FAIL get_comm_name(ranks_per_server={P}): {type(e).__name__}: {e}")
            say("FAILED (the communicator)")
            return 1
        say(f"communicator {ep2}: ranks_per_server {P}")
        runs += [(f"{n}@rps{P}", n, ep2, P) for n, _, _, _ in runs if n.startswith("hierarchy")]
    names = [r[0] for r in runs]
    if not names:
        say(f"FAILED (no configuration matches --only {args.only!r})")
        return 1
    failed = []
    for name, config, group_ep, group_rps in runs:
        start = time.monotonic()
        try:
            c = make_config(world, CONFIGS[config])
            what = run_config(c, group_ep, rank, group_rps)
            say(f"PASS {name} (W {c['W']}, E {c['E']}, Sr {c['Sr']}, {what}, {time.monotonic() - start:.2f} s)")
        except Exception as e:  # noqa: BLE001
            failed.append(name)
            say(f"FAIL {name}: {type(e).__name__}: {e}")
            if not isinstance(e, AssertionError):
                traceback.print_exc()
        dist.barrier()  # the next configuration starts together (a removed rank does not run ahead)
    if failed:
        say(f"FAILED ({len(failed)} of {len(names)} configurations: {', '.join(failed)})")
    else:
        say(f"ALL PASS ({len(names)} configurations)")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
