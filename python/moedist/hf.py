"""transformers integration: expert parallelism for the MoE models of the transformers library.

    import torch.distributed as dist, moedist.hf
    dist.init_process_group("gloo")                  # one process per rank, all on this host
    model = AutoModelForCausalLM.from_config(cfg)    # or from_pretrained(...): every rank loads the model
    moedist.hf.shard_experts(model)                  # this rank keeps its experts only
    logits = model(input_ids=my_slice).logits        # every rank runs its own slice of the batch

How: transformers (5.x) routes the experts of its MoE blocks through a registry of implementations
(`transformers.integrations.moe.ExpertsInterface`; the experts classes are decorated with
`use_experts_implementation` and call `config._experts_implementation`). moedist registers one more
implementation, "moedist", and shard_experts selects it with `model.set_experts_implementation`. The
block's own router runs unchanged on every rank (its top-k, normalization, DeepSeek-V3's grouped top-k
with e_score_correction_bias and routed_scaling_factor, Mixtral's softmax over the top-k), so are the
shared experts and their gate (Qwen2-MoE's sigmoid gate, DeepSeek-V3's shared MLP), which stay
replicated. Only the routed experts change: the experts module keeps the weights of its local experts
(rank r: experts [r*L, (r+1)*L)), and its forward dispatches the tokens with moedist, runs the local
experts on their rows with the module's own math (gate_up / up projection, activation or _apply_gate,
down projection, biases and transposed layouts as the module declares them), and combines. Any model
whose experts class uses the registry works the same way (transformers has dozens); Qwen2-MoE,
Qwen3-MoE, Mixtral, DeepSeek-V3, GPT-OSS, OLMoE, GLM-4-MoE and DeepSeek-V2 are tested.

Numerics: the rows travel in bf16 (or fp16: wire_dtype), the experts compute in the model's dtype, and
combine sums the K weighted outputs in float32 (k ascending, each product rounded to float32 before the
add) and rounds the sum to the wire dtype; so a float32 model matches the one-process model within bf16
rounding, and a one-process emulation of that rounding bit for bit (tests/python/test_hf.py).
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .layer import EpBuffer

IMPLEMENTATION = "moedist"
_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


def _require_transformers():
    try:
        import transformers  # noqa: F401
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "moedist.hf needs transformers >= 5.24 (its experts implementation registry, "
            "transformers.integrations.moe.ExpertsInterface): pip install 'transformers>=5.24'") from e


def expert_forward(module: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `e` (an index into the module's stacked weights) of a transformers experts module on rows x,
    with the module's own layout flags (has_gate, has_bias, is_transposed, has_post_expert_norm)."""
    def proj(x, w, b):
        y = torch.matmul(x, w) if module.is_transposed else F.linear(x, w)
        return y + b if b is not None else y

    if module.has_gate:
        h = proj(x, module.gate_up_proj[e], module.gate_up_proj_bias[e] if module.has_bias else None)
        h = module._apply_gate(h)
    else:
        h = proj(x, module.up_proj[e], module.up_proj_bias[e] if module.has_bias else None)
        h = module.act_fn(h)
    y = proj(h, module.down_proj[e], module.down_proj_bias[e] if module.has_bias else None)
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    return y


def _local_experts(module, recv_x: torch.Tensor, expert_token_nums: torch.Tensor) -> torch.Tensor:
    out = recv_x.new_empty((recv_x.shape[0], getattr(module, "hidden_dim", recv_x.shape[1])))
    start = 0
    for e, n in enumerate(expert_token_nums.tolist()):
        if n:
            out[start:start + n] = expert_forward(module, e, recv_x[start:start + n])
            start += n
    return out


def moedist_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "moedist" experts implementation: dispatch -> this rank's experts -> combine.

    A module that shard_experts did not shard (e.g. of another model sharing the config) runs its own
    eager forward."""
    buf = getattr(self, "_moedist_buffer", None)
    if buf is None:
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    return buf(hidden_states, top_k_index, top_k_weights, functools.partial(_local_experts, self))


def register() -> None:
    """Registers the "moedist" experts implementation with transformers (idempotent)."""
    _require_transformers()
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION) is not moedist_experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moedist_experts_forward)


def experts_modules(model: torch.nn.Module):
    """(name, module) of every experts module of `model` that goes through transformers' registry."""
    found = []
    for name, m in model.named_modules():
        fwd = getattr(type(m), "forward", None)
        if (hasattr(m, "_is_expert_parallel") and hasattr(m, "num_experts") and hasattr(m, "down_proj")
                and getattr(fwd, "__wrapped__", None) is not None):
            found.append((name, m))
    return found


def shard_experts(model: torch.nn.Module, group=None, *, wire_dtype: Optional[torch.dtype] = None,
                  quant_mode: int = 0, max_tokens_per_rank: Union[None, int, str] = "auto",
                  timeout: Optional[float] = None) -> torch.nn.Module:
    """Makes every MoE block of a transformers model run its routed experts expert-parallel over `group`.

    Collective: every rank of the group calls it, with the same model (same weights: the same checkpoint,
    or the same seed). group: a torch.distributed ProcessGroup (default: the default group), every rank
    a process on this host. Each experts module keeps its local experts' weights (num_experts must be a
    multiple of the group size) and runs through moedist; the rest of the model is unchanged and
    replicated, so each rank then runs the model on its own slice of the batch, and every rank must run
    the same number of forward passes (each MoE layer is a collective).
    wire_dtype: bfloat16 (default) or float16 for the rows on the wire. quant_mode 2: int8 dispatch.
    max_tokens_per_rank: "auto" (default) agrees on the largest token count of the ranks in every MoE
    call, so ranks may hold slices of different sizes; None when every rank always passes the same
    number of tokens (saves that all_reduce); an int as a fixed bound.
    Returns the model (changed in place). Raises ValueError when the model has no experts module that
    uses transformers' experts registry. For inference (the ops have no autograd); do not switch the
    model to another experts implementation afterwards (the experts modules hold this rank's experts only).
    """
    register()
    import torch.distributed as dist

    if group is None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("moedist.hf.shard_experts: torch.distributed is not initialized "
                             "(call dist.init_process_group first, or pass group=)")
        group = dist.group.WORLD
    mods = experts_modules(model)
    if not mods:
        raise ValueError(f"moedist.hf.shard_experts: {type(model).__name__} has no experts module that uses "
                         f"transformers' experts registry (classes decorated with use_experts_implementation, "
                         f"e.g. Qwen2MoeExperts, Qwen3MoeExperts, MixtralExperts, DeepseekV3Experts)")
    buffers = {}
    for name, m in mods:
        if getattr(m, "_moedist_buffer", None) is not None:
            continue  # already sharded
        E = int(m.num_experts)
        buf = buffers.get(E)
        if buf is None:
            try:
                buf = EpBuffer(group, E, wire_dtype=wire_dtype, quant_mode=quant_mode,
                               max_tokens_per_rank=max_tokens_per_rank, timeout=timeout)
            except ValueError as e:
                raise ValueError(f"moedist.hf.shard_experts: {name}: {e}") from None
            buffers[E] = buf
        for pname in _EXPERT_PARAMS:
            p = getattr(m, pname, None)
            if isinstance(p, torch.Tensor) and p.dim() >= 1 and p.shape[0] == E:
                local = torch.nn.Parameter(buf.shard(p.detach()), requires_grad=p.requires_grad)
                setattr(m, pname, local)
        m.num_local_experts = buf.num_local_experts
        m._moedist_buffer = buf
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(IMPLEMENTATION)
    for _, m in mods:
        # A bare module tree, or a model class whose switch transformers does not apply: point the experts'
        # own configs at the implementation (a sharded module must never run another implementation).
        if getattr(m.config, "_experts_implementation", None) != IMPLEMENTATION:
            m.config._experts_implementation = IMPLEMENTATION
    return model
