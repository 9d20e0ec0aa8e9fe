"""An MoE layer whose tokens travel through MC2 (dispatch_v2 / combine_v2), organised the way serving
engines on Ascend organise it: a token dispatcher object that finds the HCCL communicator of its
expert-parallel group once, builds the keyword arguments of both operators from the router's output,
and hands the grouped tokens to a grouped expert MLP (SwiGLU) between dispatch and combine.

Ranks hold different numbers of tokens (padded to the largest, padding masked out with x_active_mask,
global_bs = max tokens per rank * EP size), the group list comes back as a cumulative sum
(expert_token_nums_type 0), and the layer runs unquantized and with dynamic int8 quantization. Every
rank compares the layer's output with the same MoE computed densely from all experts' weights.

On an Atlas A3 server:    python mc2_token_dispatcher.py
"""
import socket
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch_npu
from torch.multiprocessing import Process

EP_SIZE = 4
NUM_EXPERTS = 8
TOP_K = 2
HIDDEN, INTER = 32, 16
MAX_TOKENS = 5


class ExpertGroup:
    """What a parallel-state module keeps per group: the HCCL group for tensors, a gloo group for objects."""

    def __init__(self, ranks):
        self.ranks = ranks
        self.device_group = dist.new_group(ranks, backend="hccl")
        self.cpu_group = dist.new_group(ranks, backend="gloo")
        self.rank_in_group = ranks.index(dist.get_rank())
        self.world_size = len(ranks)


class Mc2TokenDispatcher:
    def __init__(self, group: ExpertGroup, num_experts: int, top_k: int, max_tokens: int):
        local_rank = dist.get_rank(group=group.device_group)
        backend = group.device_group._get_backend(torch.device("npu"))
        self.group_name = backend.get_hccl_comm_name(local_rank)
        self.ep_rank_id = group.rank_in_group
        self.ep_world_size = group.world_size
        self.num_experts, self.top_k = num_experts, top_k
        self.global_bs = max_tokens * self.ep_world_size
        if not hasattr(torch_npu, "npu_moe_distribute_dispatch_v2"):
            raise RuntimeError("this torch_npu has no npu_moe_distribute_dispatch_v2")

    def _dispatch_kwargs(self, hidden_states, topk_ids, mc2_mask, with_quant):
        return {
            "x": hidden_states, "expert_ids": topk_ids, "expert_shard_type": 0, "shared_expert_rank_num": 0,
            "moe_expert_num": self.num_experts, "global_bs": self.global_bs, "expert_token_nums_type": 0,
            "scales": None, "quant_mode": 2 if with_quant else 0, "group_ep": self.group_name,
            "ep_world_size": self.ep_world_size, "ep_rank_id": self.ep_rank_id,
            "group_tp": self.group_name, "tp_world_size": 1, "tp_rank_id": 0, "x_active_mask": mc2_mask,
        }

    def token_dispatch(self, hidden_states, topk_weights, topk_ids, mc2_mask: Optional[torch.Tensor], with_quant):
        out = torch_npu.npu_moe_distribute_dispatch_v2(**self._dispatch_kwargs(hidden_states, topk_ids, mc2_mask,
                                                                               with_quant))
        expand_x, dynamic_scale, assist_info, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = out
        ctx = {"topk_ids": topk_ids, "topk_weights": topk_weights, "assist_info_for_combine": assist_info,
               "ep_recv_counts": ep_recv_counts, "tp_recv_counts": tp_recv_counts, "expand_scales": expand_scales,
               "mc2_mask": mc2_mask, "with_quant": with_quant}
        return {"hidden_states": expand_x, "group_list": expert_token_nums, "group_list_type": 0,
                "dynamic_scale": dynamic_scale if with_quant else None, "context": ctx}

    def token_combine(self, hidden_states, ctx):
        tp_send_counts = ctx["tp_recv_counts"]
        if ctx["with_quant"]:
            tp_send_counts = torch.empty(1, dtype=torch.int32, device=hidden_states.device)
        return torch_npu.npu_moe_distribute_combine_v2(
            expand_x=hidden_states, expert_ids=ctx["topk_ids"], expert_scales=ctx["topk_weights"].to(torch.float32),
            expert_shard_type=0, shared_expert_rank_num=0, moe_expert_num=self.num_experts, global_bs=self.global_bs,
            ep_send_counts=ctx["ep_recv_counts"], group_ep=self.group_name, ep_world_size=self.ep_world_size,
            ep_rank_id=self.ep_rank_id, expand_scales=ctx["expand_scales"],
            assist_info_for_combine=ctx["assist_info_for_combine"], tp_send_counts=tp_send_counts,
            group_tp=self.group_name, tp_world_size=1, tp_rank_id=0, x_active_mask=ctx["mc2_mask"])


def expert_weights():
    """All experts' weights, the same on every rank: w13 (E, H, 2I), w2 (E, I, H)."""
    g = torch.Generator().manual_seed(7)
    w13 = (torch.randn(NUM_EXPERTS, HIDDEN, 2 * INTER, generator=g) / HIDDEN ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(NUM_EXPERTS, INTER, HIDDEN, generator=g) / INTER ** 0.5).to(torch.bfloat16)
    return w13, w2


def swiglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_mlp(x, group_list, w13, w2, dynamic_scale):
    """The local experts over their contiguous row groups (group_list: cumulative row counts)."""
    if dynamic_scale is not None:
        x = (x.to(torch.float32) * dynamic_scale.unsqueeze(-1)).to(torch.bfloat16)
    out = torch.zeros(x.shape[0], HIDDEN, dtype=torch.bfloat16, device=x.device)
    start = 0
    for e, end in enumerate(group_list.tolist()):
        if end > start:
            h = swiglu(x[start:end].float() @ w13[e].float()).to(torch.bfloat16)
            out[start:end] = (h.float() @ w2[e].float()).to(torch.bfloat16)
        start = end
    return out


def run(rank, port, queue):
    torch_npu.npu.set_device(rank)
    dist.init_process_group(backend="hccl", rank=rank, world_size=EP_SIZE, init_method=f"tcp://127.0.0.1:{port}")
    group = ExpertGroup(list(range(EP_SIZE)))
    dispatcher = Mc2TokenDispatcher(group, NUM_EXPERTS, TOP_K, MAX_TOKENS)
    w13, w2 = expert_weights()
    local = NUM_EXPERTS // EP_SIZE
    my_w13, my_w2 = w13[rank * local:(rank + 1) * local].npu(), w2[rank * local:(rank + 1) * local].npu()
    router = torch.randn(HIDDEN, NUM_EXPERTS, generator=torch.Generator().manual_seed(3))

    ok = True
    for with_quant in (False, True):
        g = torch.Generator().manual_seed(100 * rank + with_quant)
        num_tokens = 1 + (rank + 2 * with_quant) % MAX_TOKENS  # different on every rank
        x = torch.zeros(MAX_TOKENS, HIDDEN, dtype=torch.bfloat16)
        x[:num_tokens] = torch.randn(num_tokens, HIDDEN, generator=g).to(torch.bfloat16)
        x = x.npu()
        mc2_mask = (torch.arange(MAX_TOKENS) < num_tokens).npu()
        topk_weights, topk_ids = torch.topk(torch.softmax(x.float() @ router.npu(), -1), TOP_K, dim=-1)
        topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
        topk_ids = topk_ids.to(torch.int32)

        d = dispatcher.token_dispatch(x, topk_weights, topk_ids, mc2_mask, with_quant)
        expert_out = grouped_mlp(d["hidden_states"], d["group_list"], my_w13, my_w2, d["dynamic_scale"])
        y = dispatcher.token_combine(expert_out, d["context"])
        torch.npu.synchronize()

        dense = torch.zeros(MAX_TOKENS, HIDDEN)
        for t in range(num_tokens):
            for k in range(TOP_K):
                e = int(topk_ids[t, k])
                h = swiglu(x[t].float() @ w13[e].float()).to(torch.bfloat16)
                dense[t] += float(topk_weights[t, k]) * (h.float() @ w2[e].float())
        err = (y.float() - dense).abs().max().item()
        tol = (0.03 if with_quant else 0.01) * dense.abs().max().item() + 1e-3
        padding_zero = bool((y[num_tokens:] == 0).all())
        good = err <= tol and padding_zero and y.shape == (MAX_TOKENS, HIDDEN)
        ok = ok and good
        print(f"rank {rank} quant={int(with_quant)}: {num_tokens} tokens, group_list {d['group_list'].tolist()}, "
              f"max |out - dense| {err:.4f} (tolerance {tol:.4f}), padding rows zero: {padding_zero}\n",
              end="", flush=True)
    queue.put((rank, ok))
    dist.barrier()
    dist.destroy_process_group()


def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.multiprocessing as mp
    queue = mp.get_context().SimpleQueue()
    procs = [Process(target=run, args=(rank, port, queue)) for rank in range(EP_SIZE)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    ok = [p.exitcode for p in procs] == [0] * EP_SIZE
    results = dict(queue.get() for _ in range(EP_SIZE)) if ok else {}
    if ok and all(results.values()):
        print("run MC2 token dispatcher MoE layer success.")
        return 0
    print(f"FAILED: exit codes {[p.exitcode for p in procs]}, results {results}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
