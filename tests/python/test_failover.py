"""Failover from PyTorch: a rank process is SIGKILLed inside dispatch or inside combine; the survivors
recover (moedist.recover), build elastic_info from the agreed mask, route to the surviving experts and go
on, bit-exact against moedist's reference for the shrunk layout. Real processes over shared memory."""
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

import moedist

_RANK_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time, torch, moedist
    from moedist import _C
    rank, world, job = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    deaths = [tuple(d.split(":")) for d in sys.argv[4].split(",")]   # rank:phase:round
    deaths = [(int(r), p, int(n)) for r, p, n in deaths]
    E, H, BS, K, ROUNDS = 2 * world, 32, 6, 3, 5
    L = E // world
    _C.init_shm_group("fo", world, rank, job, 3000, 0)

    # The victim dies inside an op: the others enter it 60 ms late; 20 ms after the victim entered, a
    # SIGALRM arrives, and its handler (which moedist runs while the rank waits, as for Ctrl-C)
    # kills the process with SIGKILL.
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGKILL))
    def arm(on):
        if on:
            signal.setitimer(signal.ITIMER_REAL, 0.02)

    def inputs(r, rnd, failed):
        g = torch.Generator().manual_seed(1000 * rnd + r)
        x = (torch.randn(BS, H, generator=g) * 2).to(torch.bfloat16)
        alive = [e for e in range(E) if not failed[e // L]]   # experts of surviving ranks (original ids)
        ids = torch.stack([torch.tensor(alive)[torch.randperm(len(alive), generator=g)[:K]] for _ in range(BS)]).to(torch.int32)
        w = torch.rand(BS, K, generator=g)
        if any(failed):
            ids = moedist.remap_expert_ids(ids, failed, 0, L)
        return x, ids, w

    def kwargs(r, rnd, failed):
        x, ids, w = inputs(r, rnd, failed)
        kw = dict(x=x, expert_ids=ids, group_ep="fo", ep_world_size=world, ep_rank_id=r, moe_expert_num=E, expert_scales=w)
        if any(failed):
            kw["elastic_info"] = moedist.make_elastic_info(failed, 0, L)
        return kw

    def expert(rows):  # a stand-in expert: y = 1.5 x, in bfloat16
        return (rows.float() * 1.5).to(torch.bfloat16)

    rnd, attempts = 0, 0
    while rnd < ROUNDS:
        failed = moedist.query_active_mask("fo", rank).tolist()
        kw = kwargs(rank, rnd, failed)
        try:
            if any(v != rank and p == "dispatch" and n == rnd for v, p, n in deaths) and attempts == 0:
                time.sleep(0.06)  # the victim waits inside dispatch meanwhile, and dies there
            arm((rank, "dispatch", rnd) in deaths)
            d = moedist.npu_moe_distribute_dispatch_v2(**kw)
            if any(v != rank and p == "combine" and n == rnd for v, p, n in deaths) and attempts == 0:
                time.sleep(0.06)
            arm((rank, "combine", rnd) in deaths)
            y = moedist.npu_moe_distribute_combine_v2(expert(d[0]), kw["expert_ids"], d[2], d[4], kw["expert_scales"], "fo", world,
                                                       rank, E, elastic_info=kw.get("elastic_info"))
        except moedist.TransportError as e:   # moedist.Timeout is one too
            attempts += 1
            assert attempts < 4, f"round {rnd} failed {attempts} times: {e}"
            rec = moedist.recover("fo", rank)
            print(f"recovered: failed={rec.failed.tolist()} generation={rec.generation} calls={rec.calls_completed}", flush=True)
            continue
        # Bit-exact against the reference of the same (shrunk) layout, all calling ranks together.
        calls = [r for r in range(world) if not failed[r]]
        ref_d = moedist.reference_dispatch_v2([kwargs(r, rnd, failed) for r in calls])
        me = calls.index(rank)
        rows = int(d[4][-1])
        for i in (0, 2):
            n = rows if i == 0 else 3 * rows
            assert torch.equal(d[i][:n], ref_d[me][i][:n]), f"round {rnd}: dispatch output {i} differs"
        ckw = []
        for j, r in enumerate(calls):
            k = kwargs(r, rnd, failed)
            ckw.append(dict(expand_x=expert(ref_d[j][0]), expert_ids=k["expert_ids"], assist_info_for_combine=ref_d[j][2],
                            ep_send_counts=ref_d[j][4], expert_scales=k["expert_scales"], ep_world_size=world, ep_rank_id=r,
                            moe_expert_num=E, elastic_info=k.get("elastic_info")))
        ref_y = moedist.reference_combine_v2(ckw)
        assert torch.equal(y, ref_y[me]), f"round {rnd}: combine output differs"
        print(f"round {rnd} ok with failed={failed}", flush=True)
        rnd += 1
        attempts = 0
    print("done", flush=True)
""")


def _run(world, deaths):
    job = "pyfo" + uuid.uuid4().hex[:12]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    spec = ",".join(f"{r}:{p}:{n}" for r, p, n in deaths)
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(r), str(world), job, spec],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for r in range(world)]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=180)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outs


@pytest.mark.timeout(300)
def test_ranks_killed_inside_dispatch_and_inside_combine_and_the_others_continue_bit_exact():
    # Rank 2 dies inside dispatch of round 1, then rank 0 inside combine of round 3 (one set of
    # processes for both: starting four torch processes is the slow part).
    world = 4
    procs, outs = _run(world, [(2, "dispatch", 1), (0, "combine", 3)])
    for victim in (2, 0):
        assert procs[victim].returncode == -9, f"rank {victim} did not die by SIGKILL: {procs[victim].returncode}\n{outs[victim]}"
    for r in (1, 3):
        assert procs[r].returncode == 0, f"rank {r}:\n{outs[r]}"
        assert "recovered: failed=[0, 0, 1, 0] generation=1" in outs[r], outs[r]
        assert "round 2 ok with failed=[0, 0, 1, 0]" in outs[r], outs[r]
        # Rank 0 may die after writing its whole part of round 3's combine: then round 4 notices.
        assert "failed=[1, 0, 1, 0] generation=2" in outs[r], outs[r]
        assert "round 4 ok with failed=[1, 0, 1, 0]" in outs[r] and outs[r].rstrip().endswith("done"), outs[r]


def test_helpers_match_the_documented_example():
    info = moedist.make_elastic_info(torch.tensor([0, 1, 0, 0], dtype=torch.int32), 0, 8)
    assert info.dtype == torch.int32
    assert info.tolist() == [1, 3, 0, 24, 0, -1, 1, 2, 0, 2, 3, -1]
    ids = torch.tensor([[0, 17], [31, 9]], dtype=torch.int32)
    with pytest.raises(ValueError, match="9"):
        moedist.remap_expert_ids(ids, [0, 1, 0, 0], 0, 8)
    out = moedist.remap_expert_ids(ids, [0, 1, 0, 0], 0, 8, replacements={9: 1})
    assert out.tolist() == [[0, 9], [23, 1]] and out.dtype == torch.int32 and out.shape == ids.shape


def test_query_and_recover_on_a_healthy_group():
    moedist.init_thread_group("fo_py_idle", 2, timeout=600.0)
    try:
        assert moedist.query_active_mask("fo_py_idle", 0).tolist() == [0, 0]
        rec = moedist.recover("fo_py_idle", 1)  # nothing failed, nobody recovers: returns at once
        assert rec.generation == 0 and rec.failed.tolist() == [0, 0] and rec.newly_failed == []
        with pytest.raises(ValueError, match="rank is required"):
            moedist.query_active_mask("fo_py_idle")
    finally:
        moedist.destroy_comm("fo_py_idle")
