"""The single-operator example of torch_npu's npu_moe_distribute_combine_v2 documentation (dispatch_v2, then
combine_v2), on CPU processes: moedist in place of torch_npu, gloo in place of hccl, moedist.get_comm_name in place of
get_hccl_comm_name, small sizes. Every rank also checks its outputs against moedist's reference of the
whole step (the inputs of all ranks are gathered for that), bit for bit.

    python examples/single_operator.py                      # 4 ranks, quant, shared expert, special experts, elastic
    python examples/single_operator.py --world-size 4 --tp-world-size 2 --no-elastic
    python examples/single_operator.py --help

Differences from that example, which does not run as printed: elastic_info is built from the control
variables (E' = local experts * MoE ranks after the scale-down, as the operator requires), removed ranks do
not call the operators, const_expert_v has shape (const_expert_num, H) as the combine document states.
"""
import argparse
import random
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moedist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=4, help="processes (dev_num * server_num)")
    p.add_argument("--tp-world-size", type=int, default=1, choices=(1, 2))
    p.add_argument("--quant-mode", type=int, default=2, choices=(0, 2), help="2: dynamic int8 quantization")
    p.add_argument("--no-dispatch-scales", action="store_true", help="no smooth scales with quant_mode 2")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--shared-expert-rank-num", type=int, default=1)
    p.add_argument("--local-moe-expert-num", type=int, default=2, help="experts per MoE rank")
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--zero-expert-num", type=int, default=1)
    p.add_argument("--copy-expert-num", type=int, default=1)
    p.add_argument("--const-expert-num", type=int, default=1)
    p.add_argument("--no-elastic", action="store_true", help="do not remove a rank with elastic_info")
    p.add_argument("--elastic-ranks", default=None, help="EP ranks that stay, e.g. 0,1,2 (default: all but the last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0, help="rendezvous port on 127.0.0.1 (0: a free one)")
    a = p.parse_args(argv)

    # The control variables of that example.
    cfg = dict(
        quant_mode=a.quant_mode, is_dispatch_scales=a.quant_mode == 2 and not a.no_dispatch_scales,
        input_dtype=a.dtype, world_size=a.world_size, shared_expert_rank_num=a.shared_expert_rank_num,
        bs=a.bs, h=a.h, k=a.k, random_seed=a.seed, tp_world_size=a.tp_world_size,
        zero_expert_num=a.zero_expert_num, copy_expert_num=a.copy_expert_num, const_expert_num=a.const_expert_num,
        master_ip="127.0.0.1", port=a.port)
    ep_world_size = a.world_size // a.tp_world_size
    moe_rank_num = ep_world_size - a.shared_expert_rank_num
    cfg.update(ep_world_size=ep_world_size, moe_rank_num=moe_rank_num,
               moe_expert_num=a.local_moe_expert_num * moe_rank_num, local_moe_expert_num=a.local_moe_expert_num)
    cfg["globalBS"] = a.bs * ep_world_size
    is_elastic = not a.no_elastic and a.tp_world_size == 1 and ep_world_size > 1
    if is_elastic:
        ranks = ([int(r) for r in a.elastic_ranks.split(",")] if a.elastic_ranks
                 else list(range(ep_world_size - 1)))
        cfg.update(elastic_ranks=ranks, elastic_shared_rank=min(a.shared_expert_rank_num, len(ranks) - 1))
        cfg["elastic_moe_num"] = a.local_moe_expert_num * (len(ranks) - cfg["elastic_shared_rank"])
    cfg["is_elastic"] = is_elastic
    return cfg


def gen_elastic_info(cfg):
    """[is_elastic, W', Sr', E', Table1[W], Table2[W]]: Table1[ep_rank] = local rank or -1,
    Table2[local rank] = ep_rank (-1 past W')."""
    if not cfg["is_elastic"]:
        return None
    W = cfg["ep_world_size"]
    ranks = cfg["elastic_ranks"]
    elastic_info = torch.zeros(4 + 2 * W, dtype=torch.int32)
    elastic_info[0] = 1
    elastic_info[1] = len(ranks)
    elastic_info[2] = cfg["elastic_shared_rank"]
    elastic_info[3] = cfg["elastic_moe_num"]
    table1 = [-1] * W
    table2 = [-1] * W
    for local_rank_id, ep_rank_id in enumerate(ranks):
        table1[ep_rank_id] = local_rank_id
        table2[local_rank_id] = ep_rank_id
    elastic_info[4:4 + W] = torch.tensor(table1, dtype=torch.int32)
    elastic_info[4 + W:] = torch.tensor(table2, dtype=torch.int32)
    return elastic_info


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
        # tp_world_size 2, ep_world_size 2: [[0, 2], [1, 3]]
        ep_ranks = [x * tp_world_size + i for x in range(ep_world_size)]
        ep_group = dist.new_group(backend="gloo", ranks=ep_ranks)
        if rank in ep_ranks:
            ep_group_t = ep_group
    for i in range(ep_world_size):
        # tp_world_size 2, ep_world_size 2: [[0, 1], [2, 3]]
        tp_ranks = [x + tp_world_size * i for x in range(tp_world_size)]
        tp_group = dist.new_group(backend="gloo", ranks=tp_ranks)
        if rank in tp_ranks:
            tp_group_t = tp_group
    return ep_group_t, tp_group_t


def make_inputs(cfg, rank):
    """This rank's tensors, a function of (seed, rank) only."""
    dtype = getattr(torch, cfg["input_dtype"])
    gen = torch.Generator().manual_seed(cfg["random_seed"] * 1000 + rank)
    rng = random.Random(cfg["random_seed"] * 1000 + rank)
    h, bs, k, E = cfg["h"], cfg["bs"], cfg["k"], cfg["moe_expert_num"]
    n_special = cfg["zero_expert_num"] + cfg["copy_expert_num"] + cfg["const_expert_num"]
    moe_ids = range(cfg["elastic_moe_num"] if cfg["is_elastic"] else E)  # after a scale-down: [0, E')
    t = dict(x=torch.randn(bs, h, generator=gen).to(dtype),
             expert_ids=torch.from_numpy(gen_unique_topk_array(rng, list(moe_ids) + list(range(E, E + n_special)), bs, k)),
             expert_scales=torch.rand(bs, k, generator=gen, dtype=torch.float32))
    shared_num = 1 if cfg["shared_expert_rank_num"] else 0
    t["scales"] = (torch.rand(shared_num + E, h, generator=gen) + 0.5) if cfg["is_dispatch_scales"] else None
    q = cfg["const_expert_num"]
    t["const_expert_alpha_1"] = torch.empty(q).uniform_(-1, 1, generator=gen).to(dtype) if q else None
    t["const_expert_alpha_2"] = torch.empty(q).uniform_(-1, 1, generator=gen).to(dtype) if q else None
    t["const_expert_v"] = torch.empty(q, h).uniform_(-1, 1, generator=gen).to(dtype) if q else None
    return t


def dispatch_kwargs(cfg, rank, t, ep_hcomm_info, tp_hcomm_info):
    tp = cfg["tp_world_size"]
    return dict(x=t["x"], expert_ids=t["expert_ids"], group_ep=ep_hcomm_info, group_tp=tp_hcomm_info,
                ep_world_size=cfg["ep_world_size"], tp_world_size=tp, ep_rank_id=rank // tp, tp_rank_id=rank % tp,
                expert_shard_type=0, shared_expert_rank_num=cfg["shared_expert_rank_num"],
                moe_expert_num=cfg["moe_expert_num"], scales=t["scales"], quant_mode=cfg["quant_mode"],
                global_bs=cfg["globalBS"], expert_scales=t["expert_scales"], elastic_info=gen_elastic_info(cfg),
                zero_expert_num=cfg["zero_expert_num"], copy_expert_num=cfg["copy_expert_num"],
                const_expert_num=cfg["const_expert_num"])


def combine_kwargs(cfg, rank, t, dispatch_out, ep_hcomm_info, tp_hcomm_info):
    expand_x, _, assist_info_for_combine, _, ep_recv_counts, tp_recv_counts, _ = dispatch_out
    if cfg["quant_mode"] > 0:
        expand_x = expand_x.to(getattr(torch, cfg["input_dtype"]))  # the example's stand-in for the experts
    tp = cfg["tp_world_size"]
    return dict(expand_x=expand_x, expert_ids=t["expert_ids"], assist_info_for_combine=assist_info_for_combine,
                ep_send_counts=ep_recv_counts, tp_send_counts=tp_recv_counts, expert_scales=t["expert_scales"],
                group_ep=ep_hcomm_info, group_tp=tp_hcomm_info, ep_world_size=cfg["ep_world_size"],
                tp_world_size=tp, ep_rank_id=rank // tp, tp_rank_id=rank % tp, expert_shard_type=0,
                shared_expert_rank_num=cfg["shared_expert_rank_num"], moe_expert_num=cfg["moe_expert_num"],
                global_bs=cfg["globalBS"], elastic_info=gen_elastic_info(cfg), ori_x=t["x"],
                const_expert_alpha_1=t["const_expert_alpha_1"], const_expert_alpha_2=t["const_expert_alpha_2"],
                const_expert_v=t["const_expert_v"], zero_expert_num=cfg["zero_expert_num"],
                copy_expert_num=cfg["copy_expert_num"], const_expert_num=cfg["const_expert_num"])


def run_npu_process(rank, cfg):
    torch.set_num_threads(1)
    dist.init_process_group(backend="gloo", rank=rank, world_size=cfg["world_size"],
                            init_method=f"tcp://{cfg['master_ip']}:{cfg['port']}")
    ep_group, tp_group = get_new_group(rank, cfg)
    ep_hcomm_info = moedist.get_comm_name(ep_group, rank)
    tp_hcomm_info = moedist.get_comm_name(tp_group, rank)
    tp = cfg["tp_world_size"]
    ep_rank_id = rank // tp
    calls = [r for r in range(cfg["world_size"]) if not cfg["is_elastic"] or r // tp in cfg["elastic_ranks"]]

    if rank not in calls:
        print(f"rank {rank} epid {ep_rank_id} tpid {rank % tp} removed by elastic_info: does not call the ops\n", flush=True)
        dist.barrier()
        dist.destroy_process_group()
        return

    t = make_inputs(cfg, rank)
    expand_x, dynamic_scales, assist_info_for_combine, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = \
        moedist.npu_moe_distribute_dispatch_v2(**dispatch_kwargs(cfg, rank, t, ep_hcomm_info, tp_hcomm_info))
    d = (expand_x, dynamic_scales, assist_info_for_combine, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales)
    x = moedist.npu_moe_distribute_combine_v2(**combine_kwargs(cfg, rank, t, d, ep_hcomm_info, tp_hcomm_info))

    # The reference of the whole step (every calling rank's inputs rebuilt from (seed, rank)).
    inputs = {r: make_inputs(cfg, r) for r in calls}
    ref_d = moedist.reference_dispatch_v2([dispatch_kwargs(cfg, r, inputs[r], "ep", "tp") for r in calls])
    me = calls.index(rank)
    rows = int(tp_recv_counts.sum()) if tp == 2 else int(ep_recv_counts.max())
    own = int(tp_recv_counts[rank % tp]) if tp == 2 else rows
    ok_d = (torch.equal(expand_x[:rows], ref_d[me][0][:rows]) and torch.equal(assist_info_for_combine[:3 * own], ref_d[me][2][:3 * own])
            and all(torch.equal(d[i], ref_d[me][i]) for i in (1, 3, 4, 5, 6)))
    ref_c = moedist.reference_combine_v2([combine_kwargs(cfg, r, inputs[r], ref_d[i], "ep", "tp") for i, r in enumerate(calls)])
    ok_c = torch.equal(x, ref_c[me])
    role = "shared-expert" if ep_rank_id < cfg["shared_expert_rank_num"] else "MoE"
    print(f"rank {rank} epid {ep_rank_id} tpid {rank % tp} ({role} rank): received {rows} rows, "
          f"expert_token_nums {expert_token_nums.tolist()}, expand_x {tuple(expand_x.shape)} {expand_x.dtype}, "
          f"combine out {tuple(x.shape)} {x.dtype}; matches reference: dispatch {ok_d}, combine {ok_c}\n"
          f"rank {rank} epid {ep_rank_id} tpid {rank % tp} npu finished! \n", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if not (ok_d and ok_c):
        raise SystemExit(1)


def main(argv=None):
    cfg = parse_args(argv)
    for key in ("bs", "globalBS", "shared_expert_rank_num", "moe_expert_num", "k", "quant_mode",
                "local_moe_expert_num", "tp_world_size", "ep_world_size", "zero_expert_num", "copy_expert_num",
                "const_expert_num", "is_elastic"):
        print(f"{key}={cfg[key]}", flush=True)
    if cfg["is_elastic"]:
        print(f"elastic_ranks={cfg['elastic_ranks']} (E'={cfg['elastic_moe_num']}, "
              f"shared ranks'={cfg['elastic_shared_rank']})", flush=True)
    if cfg["tp_world_size"] != 1 and cfg["local_moe_expert_num"] > 1:
        print("unSupported tp = 2 and local moe > 1")
        return 0
    if cfg["shared_expert_rank_num"] >= cfg["ep_world_size"]:
        print("shared_expert_rank_num must be smaller than ep_world_size")
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
        p.join(300)
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
