"""The graph-mode example of torch_npu's npu_moe_distribute_combine_v2 documentation, on CPU processes:
a model calling dispatch_v2 and combine_v2, compiled with torch.compile(fullgraph=True) (inductor by default, in place of torchair's NPU backend),
moedist in place of torch_npu, gloo in place of hccl. The compiled model's output is compared with the
same model run eagerly, bit for bit.

    python examples/graph_mode.py                        # 4 ranks, quant, shared expert, special experts, elastic
    python examples/graph_mode.py --backend aot_eager    # trace without compiling kernels (faster)
    python examples/graph_mode.py --help

The ops are torch custom operators with fake implementations (output shapes from the integer arguments),
so the whole forward is one graph. As in that example, the group names and integers are forward() inputs;
torch.compile treats them as constants of the graph.
"""
import argparse
import logging
import random
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moedist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=4, help="processes (dev_num * server_num)")
    p.add_argument("--tp-world-size", type=int, default=1, choices=(1, 2))
    p.add_argument("--quant-mode", type=int, default=2, choices=(0, 2))
    p.add_argument("--no-dispatch-scales", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--shared-expert-rank-num", type=int, default=1)
    p.add_argument("--local-moe-expert-num", type=int, default=2)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--zero-expert-num", type=int, default=1)
    p.add_argument("--copy-expert-num", type=int, default=1)
    p.add_argument("--const-expert-num", type=int, default=1)
    p.add_argument("--no-elastic", action="store_true")
    p.add_argument("--backend", default="inductor", help="torch.compile backend: inductor, aot_eager, eager")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    ep_world_size = a.world_size // a.tp_world_size
    moe_rank_num = ep_world_size - a.shared_expert_rank_num
    cfg = dict(quant_mode=a.quant_mode, is_dispatch_scales=a.quant_mode == 2 and not a.no_dispatch_scales,
               input_dtype=a.dtype, world_size=a.world_size, tp_world_size=a.tp_world_size,
               ep_world_size=ep_world_size, shared_expert_rank_num=a.shared_expert_rank_num,
               local_moe_expert_num=a.local_moe_expert_num, moe_expert_num=a.local_moe_expert_num * moe_rank_num,
               bs=a.bs, h=a.h, k=a.k, globalBS=a.bs * ep_world_size, zero_expert_num=a.zero_expert_num,
               copy_expert_num=a.copy_expert_num, const_expert_num=a.const_expert_num, backend=a.backend,
               random_seed=a.seed, master_ip="127.0.0.1", port=a.port)
    cfg["is_elastic"] = not a.no_elastic and a.tp_world_size == 1 and ep_world_size > 1
    if cfg["is_elastic"]:  # the last EP rank is removed; E' keeps the experts per MoE rank
        cfg["elastic_ranks"] = list(range(ep_world_size - 1))
        cfg["elastic_shared_rank"] = min(a.shared_expert_rank_num, ep_world_size - 2)
        cfg["elastic_moe_num"] = a.local_moe_expert_num * (ep_world_size - 1 - cfg["elastic_shared_rank"])
    return cfg


def gen_elastic_info(cfg):
    if not cfg["is_elastic"]:
        return None
    W, ranks = cfg["ep_world_size"], cfg["elastic_ranks"]
    table1, table2 = [-1] * W, [-1] * W
    for local_rank_id, ep_rank_id in enumerate(ranks):
        table1[ep_rank_id] = local_rank_id
        table2[local_rank_id] = ep_rank_id
    return torch.tensor([1, len(ranks), cfg["elastic_shared_rank"], cfg["elastic_moe_num"]] + table1 + table2,
                        dtype=torch.int32)


class MOE_DISTRIBUTE_GRAPH_Model(torch.nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x, expert_ids, group_ep, group_tp, ep_world_size, tp_world_size,
                ep_rank_id, tp_rank_id, expert_shard_type, shared_expert_rank_num, moe_expert_num,
                scales, quant_mode, global_bs, expert_scales, elastic_info, ori_x, const_expert_alpha_1,
                const_expert_alpha_2, const_expert_v, zero_expert_num, copy_expert_num, const_expert_num):
        output_dispatch_npu = moedist.npu_moe_distribute_dispatch_v2(x=x,
                                                                    expert_ids=expert_ids,
                                                                    group_ep=group_ep,
                                                                    group_tp=group_tp,
                                                                    ep_world_size=ep_world_size,
                                                                    tp_world_size=tp_world_size,
                                                                    ep_rank_id=ep_rank_id,
                                                                    tp_rank_id=tp_rank_id,
                                                                    expert_shard_type=expert_shard_type,
                                                                    shared_expert_rank_num=shared_expert_rank_num,
                                                                    moe_expert_num=moe_expert_num,
                                                                    scales=scales,
                                                                    quant_mode=quant_mode,
                                                                    global_bs=global_bs,
                                                                    expert_scales=expert_scales,
                                                                    elastic_info=elastic_info,
                                                                    zero_expert_num=zero_expert_num,
                                                                    copy_expert_num=copy_expert_num,
                                                                    const_expert_num=const_expert_num)
        expand_x_npu, dynamic_scales, assist_info_for_combine_npu, _, ep_recv_counts_npu, tp_recv_counts_npu, \
            expand_scales = output_dispatch_npu
        if expand_x_npu.dtype == torch.int8:  # dequantize (the experts would run here)
            expand_x_npu = (expand_x_npu.to(torch.float32) * dynamic_scales.unsqueeze(1)).to(x.dtype)
        output_combine_npu = moedist.npu_moe_distribute_combine_v2(expand_x=expand_x_npu,
                                                                  expert_ids=expert_ids,
                                                                  assist_info_for_combine=assist_info_for_combine_npu,
                                                                  ep_send_counts=ep_recv_counts_npu,
                                                                  tp_send_counts=tp_recv_counts_npu,
                                                                  expert_scales=expert_scales,
                                                                  group_ep=group_ep,
                                                                  group_tp=group_tp,
                                                                  ep_world_size=ep_world_size,
                                                                  tp_world_size=tp_world_size,
                                                                  ep_rank_id=ep_rank_id,
                                                                  tp_rank_id=tp_rank_id,
                                                                  expert_shard_type=expert_shard_type,
                                                                  shared_expert_rank_num=shared_expert_rank_num,
                                                                  moe_expert_num=moe_expert_num,
                                                                  global_bs=global_bs,
                                                                  elastic_info=elastic_info,
                                                                  ori_x=ori_x,
                                                                  const_expert_alpha_1=const_expert_alpha_1,
                                                                  const_expert_alpha_2=const_expert_alpha_2,
                                                                  const_expert_v=const_expert_v,
                                                                  zero_expert_num=zero_expert_num,
                                                                  copy_expert_num=copy_expert_num,
                                                                  const_expert_num=const_expert_num)
        x = output_combine_npu
        x_combine_res = output_combine_npu
        return [x_combine_res, output_combine_npu]


def gen_unique_topk_array(rng, ids, bs, k):
    array = []
    for _ in range(bs):
        top_idx = list(ids)
        rng.shuffle(top_idx)
        array.append(top_idx[0:k])
    return np.array(array, dtype=np.int32).reshape(bs, k)


def get_new_group(rank, cfg):
    tp_world_size, ep_world_size = cfg["tp_world_size"], cfg["ep_world_size"]
    for i in range(tp_world_size):
        ep_ranks = [x * tp_world_size + i for x in range(ep_world_size)]
        ep_group = dist.new_group(backend="gloo", ranks=ep_ranks)
        if rank in ep_ranks:
            ep_group_t = ep_group
    for i in range(ep_world_size):
        tp_ranks = [x + tp_world_size * i for x in range(tp_world_size)]
        tp_group = dist.new_group(backend="gloo", ranks=tp_ranks)
        if rank in tp_ranks:
            tp_group_t = tp_group
    return ep_group_t, tp_group_t


def run_npu_process(rank, cfg):
    torch.set_num_threads(1)
    for noisy in ("torch.utils.flop_counter", "torch.utils.cpp_extension"):  # "no triton", "no CUDA runtime"
        logging.getLogger(noisy).setLevel(logging.ERROR)
    dist.init_process_group(backend="gloo", rank=rank, world_size=cfg["world_size"],
                            init_method=f"tcp://{cfg['master_ip']}:{cfg['port']}")
    ep_group, tp_group = get_new_group(rank, cfg)
    ep_hcomm_info = moedist.get_comm_name(ep_group, rank)
    tp_hcomm_info = moedist.get_comm_name(tp_group, rank)
    tp_world_size = cfg["tp_world_size"]
    if cfg["is_elastic"] and rank // tp_world_size not in cfg["elastic_ranks"]:
        print(f"rank {rank} epid {rank // tp_world_size} removed by elastic_info: does not call the model\n", flush=True)
        dist.barrier()
        dist.destroy_process_group()
        return

    dtype = getattr(torch, cfg["input_dtype"])
    gen = torch.Generator().manual_seed(cfg["random_seed"] * 1000 + rank)
    rng = random.Random(cfg["random_seed"] * 1000 + rank)
    h, bs, k, E = cfg["h"], cfg["bs"], cfg["k"], cfg["moe_expert_num"]
    n_special = cfg["zero_expert_num"] + cfg["copy_expert_num"] + cfg["const_expert_num"]
    moe_ids = range(cfg["elastic_moe_num"] if cfg["is_elastic"] else E)
    x = torch.randn(bs, h, generator=gen).to(dtype)
    expert_ids = torch.from_numpy(gen_unique_topk_array(rng, list(moe_ids) + list(range(E, E + n_special)), bs, k))
    expert_scales = torch.rand(bs, k, generator=gen, dtype=torch.float32)
    scales_shape = (1 + E, h) if cfg["shared_expert_rank_num"] else (E, h)
    scales = torch.rand(scales_shape, generator=gen) + 0.5 if cfg["is_dispatch_scales"] else None
    q = cfg["const_expert_num"]
    const_expert_alpha_1 = torch.empty(q).uniform_(-1, 1, generator=gen).to(dtype) if q else None
    const_expert_alpha_2 = torch.empty(q).uniform_(-1, 1, generator=gen).to(dtype) if q else None
    const_expert_v = torch.empty(q, h).uniform_(-1, 1, generator=gen).to(dtype) if q else None
    elastic_info = gen_elastic_info(cfg)

    args = (x, expert_ids, ep_hcomm_info, tp_hcomm_info, cfg["ep_world_size"], tp_world_size,
            rank // tp_world_size, rank % tp_world_size, 0, cfg["shared_expert_rank_num"], E, scales,
            cfg["quant_mode"], cfg["globalBS"], expert_scales, elastic_info, x, const_expert_alpha_1,
            const_expert_alpha_2, const_expert_v, cfg["zero_expert_num"], cfg["copy_expert_num"], q)
    model = MOE_DISTRIBUTE_GRAPH_Model()
    eager = model(*args)  # single-operator mode, for comparison
    model = torch.compile(model, backend=cfg["backend"], dynamic=False, fullgraph=True)
    start = time.monotonic()
    output = model.forward(*args)
    took = time.monotonic() - start
    output2 = model.forward(*args)
    same = all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(eager, output, output2))
    print(f"rank {rank} epid {rank // tp_world_size} tpid {rank % tp_world_size}: compiled ({cfg['backend']}, "
          f"fullgraph, first call {took:.1f} s) output {tuple(output[0].shape)} {output[0].dtype}, "
          f"equal to eager: {same}\n"
          f"rank {rank} epid {rank // tp_world_size} tpid {rank % tp_world_size} npu finished! \n", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


def main(argv=None):
    cfg = parse_args(argv)
    for key in ("bs", "globalBS", "shared_expert_rank_num", "moe_expert_num", "k", "quant_mode",
                "local_moe_expert_num", "tp_world_size", "ep_world_size", "is_elastic", "backend"):
        print(f"{key}={cfg[key]}", flush=True)
    if cfg["tp_world_size"] != 1 and cfg["local_moe_expert_num"] > 1:
        print("unSupported tp = 2 and local moe > 1")
        return 0
    if cfg["port"] == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            cfg["port"] = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    p_list = [ctx.Process(target=run_npu_process, args=(rank, cfg)) for rank in range(cfg["world_size"])]
    for p in p_list:
        p.start()
    for p in p_list:
        p.join(600)
        if p.is_alive():
            p.kill()
            p.join()
    failed = [r for r, p in enumerate(p_list) if p.exitcode != 0]
    if failed:
        print(f"run moedist FAILED on ranks {failed}")
        return 1
    print("run moedist success.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
