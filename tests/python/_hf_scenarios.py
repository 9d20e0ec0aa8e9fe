"""Scenarios for the worker processes of _cluster.py (run as "_hf_scenarios.<name>"): transformers
models sharded with moedist.hf, and the EpBuffer layer."""
from __future__ import annotations

import torch
import torch.distributed as dist

import moedist

WIRE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def hf_ep(ctx, arch: str, seed: int = 0, batch: int = 8, seq: int = 16, ragged: bool = False, quant_mode: int = 0,
          wire: str = "bf16", passes: int = 1):
    """Builds the tiny model, shards its experts over the default group, runs this rank's batch slice."""
    import moedist.hf
    import _hf_models as hm

    model = hm.make_model(arch, seed)
    checksum = hm.param_checksum(model)
    moedist.hf.shard_experts(model, wire_dtype=WIRE[wire], quant_mode=quant_mode,
                             max_tokens_per_rank="auto" if ragged else None)
    mods = moedist.hf.experts_modules(model)
    local = sorted({int(m.gate_up_proj.shape[0]) for _, m in mods})
    a, b = hm.batch_slices(batch, ctx.world, ragged)[ctx.rank]
    ids = hm.make_inputs(seed, batch, seq)[a:b]
    outs = []
    with torch.no_grad():
        for _ in range(passes):
            outs.append(model(input_ids=ids, use_cache=False).logits)
    return dict(logits=outs[0].numpy(), same_each_pass=all(torch.equal(outs[0], o) for o in outs),
                checksum=checksum, local_experts=local, num_moe_modules=len(mods),
                implementation=model.config._experts_implementation)


def layer_process_group(ctx, E: int = 8, T: int = 5, H: int = 16, K: int = 2):
    """EpBuffer and the functional ops with the ProcessGroup itself as the group, against the name."""
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # int64, as torch.topk gives
    w = torch.rand(T, K, generator=g)
    pg = dist.group.WORLD
    buf = moedist.EpBuffer(pg, E)
    experts = [(lambda s: (lambda t: t * s))(float(e + 1)) for e in buf.local_experts]
    y_pg = buf(x, ids, w, experts)
    name = moedist.get_comm_name(pg)
    y_name = moedist.EpBuffer(name, E, rank=ctx.rank, world_size=ctx.world)(x, ids, w, experts)
    # the ops: group_ep as a ProcessGroup
    xb, ids32 = x.to(torch.bfloat16), ids.to(torch.int32)
    outs = moedist.npu_moe_distribute_dispatch_v2(xb, ids32, pg, ctx.world, ctx.rank, E)
    outs_name = moedist.npu_moe_distribute_dispatch_v2(xb, ids32, name, ctx.world, ctx.rank, E)
    rows = int(outs[3].sum())
    y_op = moedist.npu_moe_distribute_combine_v2(outs[0][:rows], ids32, outs[2], outs[4], w, pg, ctx.world,
                                                 ctx.rank, E)
    try:
        moedist.npu_moe_distribute_dispatch_v2(xb, ids32, 3.5, ctx.world, ctx.rank, E)
        type_error = None
    except TypeError as e:
        type_error = str(e)
    return dict(same_layer=torch.equal(y_pg, y_name), dtype=str(y_pg.dtype),
                same_dispatch=torch.equal(outs[0][:rows], outs_name[0][:rows]),
                combine_ok=torch.equal(y_op, moedist.npu_moe_distribute_combine_v2(
                    outs_name[0][:rows], ids32, outs_name[2], outs_name[4], w, name, ctx.world, ctx.rank, E)),
                type_error=type_error)


def layer_peer_rejects(ctx, bad_rank: int = 1, E: int = 8, T: int = 4, H: int = 8):
    """One rank passes float ids to an EpBuffer with max_tokens_per_rank='auto': it raises the ValueError,
    every other rank a RuntimeError naming it, at once; then all ranks run a good call."""
    import time

    buf = moedist.EpBuffer(dist.group.WORLD, E, max_tokens_per_rank="auto", timeout=20)
    x = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(T)])
    w = torch.rand(T, 2)
    experts = [lambda t: t] * buf.num_local_experts
    t0 = time.monotonic()
    try:
        buf(x, ids.float() if ctx.rank == bad_rank else ids, w, experts)
        raised, msg = None, ""
    except Exception as e:  # noqa: BLE001
        raised, msg = type(e).__name__, str(e)
    waited = time.monotonic() - t0
    after = buf(x, ids, w, experts)
    return dict(raised=raised, message=msg, waited=waited, after_ok=bool(torch.isfinite(after).all()))
