"""MoE dispatch + combine on 16 NPU ranks, single-operator mode, written for Ascend (torch_npu, HCCL).

Two ranks hold copies of the shared expert, fourteen hold two routed experts each; dispatch quantizes the
tokens to int8 with per-expert smooth scales (quant_mode 2). Each expert multiplies its dequantized
tokens by a constant of its own, so every rank can compute what its combine must return from all ranks'
inputs (gathered with all_gather) and check it, together with the per-expert token counts.

On an Atlas A3 server:    python single_operator_16ranks.py
"""
import argparse
import socket

import torch
import torch.distributed as dist
import torch_npu
from torch.multiprocessing import Process

WORLD_SIZE = 16
SHARED_EXPERT_RANK_NUM = 2
LOCAL_EXPERTS = 2
MOE_EXPERT_NUM = (WORLD_SIZE - SHARED_EXPERT_RANK_NUM) * LOCAL_EXPERTS
BS, H, K = 4, 64, 3
DTYPE = torch.bfloat16


def expert_factor(expert):
    """The routed expert `expert` multiplies by this; the shared expert (-1) by 0.5."""
    return 0.5 if expert < 0 else 1.0 + (expert % 5) * 0.25


def make_inputs(rank, seed):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(BS, H, generator=g).to(DTYPE)
    expert_ids = torch.stack([torch.randperm(MOE_EXPERT_NUM, generator=g)[:K] for _ in range(BS)]).to(torch.int32)
    expert_scales = torch.rand(BS, K, generator=g) + 0.1
    return x, expert_ids, expert_scales


def run(rank, port, seed, result_queue):
    torch_npu.npu.set_device(rank)
    dist.init_process_group(backend="hccl", rank=rank, world_size=WORLD_SIZE, init_method=f"tcp://127.0.0.1:{port}")
    ep_group = dist.new_group(backend="hccl", ranks=list(range(WORLD_SIZE)))
    group_ep = ep_group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)

    x, expert_ids, expert_scales = make_inputs(rank, seed)
    x, expert_ids, expert_scales = x.npu(), expert_ids.npu(), expert_scales.npu()
    # Smooth scales: row 0 for the shared expert, rows 1.. for the routed experts (same on every rank).
    scales = (torch.arange(1 + MOE_EXPERT_NUM, dtype=torch.float32)[:, None] * 0.01 + torch.linspace(0.5, 1.5, H)).npu()

    expand_x, dynamic_scales, assist_info, expert_token_nums, ep_recv_counts, tp_recv_counts, _ = \
        torch_npu.npu_moe_distribute_dispatch_v2(
            x=x, expert_ids=expert_ids, group_ep=group_ep, ep_world_size=WORLD_SIZE, ep_rank_id=rank,
            moe_expert_num=MOE_EXPERT_NUM, scales=scales, quant_mode=2, expert_shard_type=0,
            shared_expert_num=1, shared_expert_rank_num=SHARED_EXPERT_RANK_NUM, global_bs=BS * WORLD_SIZE)

    # The experts: dequantize, multiply by the expert's factor. Rows come grouped by local expert.
    rows = int(expert_token_nums.sum())
    hidden = expand_x[:rows].float() * dynamic_scales[:rows, None]
    out = torch.zeros(expand_x.shape[0], H, dtype=DTYPE, device="npu")
    start = 0
    for local, count in enumerate(expert_token_nums.tolist()):
        if rank < SHARED_EXPERT_RANK_NUM:
            expert = -1
        else:
            expert = (rank - SHARED_EXPERT_RANK_NUM) * LOCAL_EXPERTS + local
        out[start:start + count] = (hidden[start:start + count] * expert_factor(expert)).to(DTYPE)
        start += count

    y = torch_npu.npu_moe_distribute_combine_v2(
        expand_x=out, expert_ids=expert_ids, assist_info_for_combine=assist_info, ep_send_counts=ep_recv_counts,
        expert_scales=expert_scales, group_ep=group_ep, ep_world_size=WORLD_SIZE, ep_rank_id=rank,
        moe_expert_num=MOE_EXPERT_NUM, tp_send_counts=tp_recv_counts, expert_shard_type=0, shared_expert_num=1,
        shared_expert_rank_num=SHARED_EXPERT_RANK_NUM, global_bs=BS * WORLD_SIZE)
    torch.npu.synchronize()

    # Dense check: what every expert gets and what combine must return.
    all_ids = [torch.empty_like(expert_ids) for _ in range(WORLD_SIZE)]
    dist.all_gather(all_ids, expert_ids)
    all_ids = torch.stack(all_ids).cpu()
    if rank >= SHARED_EXPERT_RANK_NUM:
        mine = [(rank - SHARED_EXPERT_RANK_NUM) * LOCAL_EXPERTS + i for i in range(LOCAL_EXPERTS)]
        expected_counts = [int((all_ids == e).sum()) for e in mine]
    else:  # the shared-expert copies split the ranks between them
        expected_counts = [BS * sum(1 for r in range(WORLD_SIZE) if r % SHARED_EXPERT_RANK_NUM == rank)]
    counts_ok = expert_token_nums.cpu().tolist() == expected_counts

    xs = x.float()[:, None, :] * scales[1 + expert_ids.long()]  # (BS, K, H): what the routed experts dequantize
    factors = torch.tensor([[expert_factor(int(e)) for e in row] for row in expert_ids.cpu()])
    expected = (expert_scales[..., None] * factors[..., None] * xs).sum(1) + 0.5 * x.float() * scales[0]
    err = (y.float() - expected).abs().max().item()
    tol = 0.02 * expected.abs().max().item()  # int8 quantization and bf16 rounding
    ok = counts_ok and err <= tol and y.shape == (BS, H) and y.dtype == DTYPE
    role = "shared" if rank < SHARED_EXPERT_RANK_NUM else "moe"
    print(f"rank {rank:2d} ({role}): expert_token_nums {expert_token_nums.tolist()} expected {expected_counts}, "
          f"max |combine - dense| {err:.4f} (tolerance {tol:.4f}) -> {'ok' if ok else 'WRONG'}\n", end="", flush=True)
    result_queue.put((rank, ok))
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.multiprocessing as mp
    queue = mp.get_context().SimpleQueue()
    procs = [Process(target=run, args=(rank, port, args.seed, queue)) for rank in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    results = dict(queue.get() for _ in range(sum(1 for p in procs if p.exitcode == 0)))
    if all(p.exitcode == 0 for p in procs) and len(results) == WORLD_SIZE and all(results.values()):
        print("run npu_moe_distribute_dispatch_v2 / combine_v2 on 16 ranks success.")
        return 0
    print(f"FAILED: exit codes {[p.exitcode for p in procs]}, results {results}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
