"""An MoE layer (dispatch -> experts -> combine) compiled into one graph with torchair, on 4 NPU ranks.

The layer is compiled with torch.compile(backend=torchair.get_npu_backend(...)) and run next to the same
layer run eagerly; every rank checks that both give the same bits. Rank 0 hosts the shared expert.

On an Atlas A3 server:    python graph_mode_torchair.py
"""
import socket

import torch
import torch.distributed as dist
import torch_npu
import torchair
from torch.multiprocessing import Process
from torchair.configs.compiler_config import CompilerConfig

WORLD_SIZE = 4
SHARED_RANKS = 1
LOCAL_EXPERTS = 2
EXPERTS = (WORLD_SIZE - SHARED_RANKS) * LOCAL_EXPERTS
BS, H, K = 6, 32, 2


class MoeLayer(torch.nn.Module):
    def __init__(self, group_ep, rank):
        super().__init__()
        self.group_ep, self.rank = group_ep, rank
        n_local = 1 if rank < SHARED_RANKS else LOCAL_EXPERTS
        g = torch.Generator().manual_seed(rank)
        self.w = torch.nn.Parameter(torch.randn(n_local, H, H, generator=g).to(torch.bfloat16) / H ** 0.5)

    def forward(self, x, expert_ids, expert_scales, scales):
        expand_x, dyn_scales, assist, token_nums, ep_counts, tp_counts, _ = torch_npu.npu_moe_distribute_dispatch_v2(
            x=x, expert_ids=expert_ids, group_ep=self.group_ep, ep_world_size=WORLD_SIZE, ep_rank_id=self.rank,
            moe_expert_num=EXPERTS, scales=scales, quant_mode=2, shared_expert_rank_num=SHARED_RANKS,
            global_bs=BS * WORLD_SIZE)
        h = (expand_x.to(torch.float32) * dyn_scales.unsqueeze(-1)).to(torch.bfloat16)
        # Expert e of this rank takes the rows of group e: a row's group from the cumulative counts.
        rows = torch.arange(h.shape[0], device=h.device)
        group = torch.bucketize(rows, torch.cumsum(token_nums, 0), right=True).clamp(max=self.w.shape[0] - 1)
        out = torch.bmm(h.unsqueeze(1), self.w[group]).squeeze(1)
        return torch_npu.npu_moe_distribute_combine_v2(
            expand_x=out, expert_ids=expert_ids, assist_info_for_combine=assist, ep_send_counts=ep_counts,
            expert_scales=expert_scales, group_ep=self.group_ep, ep_world_size=WORLD_SIZE, ep_rank_id=self.rank,
            moe_expert_num=EXPERTS, tp_send_counts=tp_counts, shared_expert_rank_num=SHARED_RANKS,
            global_bs=BS * WORLD_SIZE)


def run(rank, port, queue):
    torch_npu.npu.set_device(rank)
    torch.npu.set_compile_mode(jit_compile=False)
    dist.init_process_group(backend="hccl", rank=rank, world_size=WORLD_SIZE, init_method=f"tcp://127.0.0.1:{port}")
    group = dist.new_group(backend="hccl", ranks=list(range(WORLD_SIZE)))
    group_ep = group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)

    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(BS, H, generator=g).to(torch.bfloat16).npu()
    expert_ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(BS)]).int().npu()
    expert_scales = torch.softmax(torch.randn(BS, K, generator=g), -1).npu()
    scales = torch.linspace(0.5, 2.0, (1 + EXPERTS) * H).reshape(1 + EXPERTS, H).npu()

    model = MoeLayer(group_ep, rank).npu()
    config = CompilerConfig()
    config.mode = "max-autotune"
    config.experimental_config.frozen_parameter = True
    npu_backend = torchair.get_npu_backend(compiler_config=config)
    compiled = torch.compile(model, backend=npu_backend, fullgraph=True, dynamic=False)

    with torch.no_grad():
        eager = model(x, expert_ids, expert_scales, scales)
        graph = compiled(x, expert_ids, expert_scales, scales)
        graph2 = compiled(x, expert_ids, expert_scales, scales)  # the captured graph, run again
    torch.npu.synchronize()
    same = torch.equal(eager, graph) and torch.equal(graph, graph2)
    print(f"rank {rank}: out {tuple(graph.shape)} {graph.dtype}, graph == eager: {same}\n", end="", flush=True)
    queue.put((rank, same))
    dist.barrier()
    dist.destroy_process_group()


def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.multiprocessing as mp
    queue = mp.get_context().SimpleQueue()
    procs = [Process(target=run, args=(rank, port, queue)) for rank in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    ok = [p.exitcode for p in procs] == [0] * WORLD_SIZE
    results = dict(queue.get() for _ in range(WORLD_SIZE)) if ok else {}
    if ok and all(results.values()):
        print("run torchair graph mode MoE layer success.")
        return 0
    print(f"FAILED: exit codes {[p.exitcode for p in procs]}, results {results}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
