"""Memory and time of dispatch + combine on W thread ranks of one Python process (the thread transport),
for large W (hundreds of ranks on one host).

    python bench/thread_ranks_scale.py --ranks 768 [--tokens 4] [--hidden 16] [--topk 4] [--rounds 3]

Every rank has E = W experts in all (one per rank). A round is one dispatch_v2 and one combine_v2 on
every rank (threads started once, a barrier before each round); its time is from the barrier to the
last rank's return. Prints the resident memory after the imports and the group's creation, the peak
resident memory (getrusage) and each round's time.
"""
import argparse
import resource
import threading
import time

import torch

import moedist


def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    o = ap.parse_args()
    W, BS, H, K = o.ranks, o.tokens, o.hidden, o.topk
    E = W
    rss0 = rss_kb()
    name = moedist.init_thread_group("scale", W, timeout=120)
    rss_group = rss_kb()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(BS, H, generator=gen).to(torch.bfloat16) for _ in range(W)]
    ids = [torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(BS)]).to(torch.int32) for _ in range(W)]
    ws = [torch.rand(BS, K, generator=gen) for _ in range(W)]
    barrier = threading.Barrier(W + 1)
    done = threading.Barrier(W + 1)
    errors = []

    def rank(r):
        try:
            for _ in range(o.rounds + 1):
                barrier.wait()
                out = moedist.npu_moe_distribute_dispatch_v2(xs[r], ids[r], name, W, r, E, expert_scales=ws[r])
                expand_x, _, assist, _, ep_recv_counts, _, expand_scales = out
                moedist.npu_moe_distribute_combine_v2(expand_x, ids[r], assist, ep_recv_counts, ws[r], name, W, r, E,
                                                      expand_scales=expand_scales)
                done.wait()
        except BaseException as e:  # noqa: BLE001
            errors.append((r, e))
            barrier.abort()
            done.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(W)]
    for t in threads:
        t.start()
    times = []
    try:
        for i in range(o.rounds + 1):  # the first round warms up (first-touch of outputs and buffers)
            barrier.wait()
            t0 = time.perf_counter()
            done.wait()
            if i:
                times.append(time.perf_counter() - t0)
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    if errors:
        raise errors[0][1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"W={W} BS={BS} H={H} K={K} E={E}: RSS after import {rss0 / 1024:.0f} MB, after group {rss_group / 1024:.0f} MB, "
          f"peak {peak / 1024:.0f} MB (peak - after import: {(peak - rss0) / 1024:.0f} MB); "
          f"round (dispatch + combine) s: {' '.join(f'{t:.3f}' for t in times)}")


if __name__ == "__main__":
    main()
