"""Rejections and interrupts: a rank that refuses its call in Python, or is interrupted with Ctrl-C while
it waits, makes its peers fail at once naming it, instead of leaving them waiting for their deadline."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["float64", "list", "sparse", "meta"])
def test_python_side_rejection_reaches_peers_at_once(pools, kind):
    # The pool's groups have a 20 s deadline: peers that waited it out would take that long.
    res = pools.get(2).run("python_side_rejection", kind=kind, bad_rank=1)
    bad, good = res[1], res[0]
    assert bad["raised"] in ("ValueError", "TypeError"), bad
    assert good["raised"] in ("TransportError", "RuntimeError"), good
    assert "rank 1 rejected its call" in good["message"], good["message"]
    assert good["seconds"] < 10, good
    assert bad["after"] == good["after"] == "ok"


_RANK_SCRIPT = textwrap.dedent("""
    import signal, sys, time, torch, moedist
    from moedist import _C
    # Ctrl-C raises KeyboardInterrupt, also where this test runs in a background job of a shell, whose
    # children inherit SIGINT ignored (Python then installs no handler of its own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rank, job = int(sys.argv[1]), sys.argv[2]
    _C.init_shm_group("sig", 2, rank, job, 20000, 0)
    x = torch.ones(4, 16, dtype=torch.bfloat16)
    ids = torch.tensor([[0], [1], [0], [1]], dtype=torch.int32)
    moedist.npu_moe_distribute_dispatch_v2(x, ids, "sig", 2, rank, 2)  # warm: later calls go straight to the wait
    print("ready", flush=True)
    if rank == 1:
        sys.stdin.readline()  # rank 0 waits for this rank in dispatch and is interrupted meanwhile; then "go"
    start = time.monotonic()
    try:
        moedist.npu_moe_distribute_dispatch_v2(x, ids, "sig", 2, rank, 2)
        print("returned", flush=True)
    except KeyboardInterrupt as e:
        print(f"KeyboardInterrupt after {time.monotonic() - start:.3f} s: {e}", flush=True)
    except RuntimeError as e:
        print(f"RuntimeError after {time.monotonic() - start:.3f} s: {e}", flush=True)
""")


@pytest.mark.timeout(60)
def test_ctrl_c_ends_a_wait_at_once_and_the_peer_fails_naming_the_rank():
    job = "sigint" + uuid.uuid4().hex[:12]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(r), job], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for r in range(2)]
    try:
        assert procs[0].stdout.readline().strip() == "ready"
        time.sleep(1.0)  # rank 0 is now waiting in dispatch for rank 1 (20 s deadline)
        sent = time.monotonic()
        procs[0].send_signal(signal.SIGINT)
        out0, _ = procs[0].communicate(timeout=30)
        took = time.monotonic() - sent
        # Only now does rank 1 call (it waits for this line however slow the machine is), and finds rank 0 gone.
        out1, _ = procs[1].communicate("go\n", timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert "KeyboardInterrupt after" in out0, out0
    assert took < 5, f"the interrupt took {took:.1f} s (the deadline is 20 s): {out0}"
    assert "RuntimeError" in out1 and "rank 0" in out1 and "abandoned" in out1, out1
    assert float(out1.split("RuntimeError after ")[1].split(" s")[0]) < 5, out1
