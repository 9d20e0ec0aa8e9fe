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
