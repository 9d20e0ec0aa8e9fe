"""Tiny random-init transformers MoE models (no downloads) and a one-process emulation of moedist's EP.

make_model(arch, seed) builds the same float32 model in every process (seeded init, one thread).
emulate_ep(model, input_ids, world) runs what `moedist.hf.shard_experts` + a forward on W ranks
compute, in one process with plain torch: W threads, thread r runs the model on rank r's batch slice (so
every dense matmul has the shapes the ranks have), and each MoE layer meets the other threads to
compute the routed experts on the rows moedist would give them (expert g gets the rows of its tokens in
(source rank, token) order, as bf16 values cast back to the model's dtype), outputs rounded to bf16, then
per token the combine's sum: float32, k ascending, each weight * output product rounded to float32
before the add (no fused multiply-add), rounded to bf16, cast to the model's dtype. Nothing of moedist
runs there except moedist.hf.expert_forward (the module's own expert math, shared by both sides).
"""
from __future__ import annotations

import copy
import threading

import torch

ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3")
# More architectures whose experts go through transformers' registry, among them GPT-OSS (transposed
# weights, biases, its own clamped gate) and DeepSeek-V2 / GLM-4-MoE (grouped routers).
MORE_ARCHS = ("gpt_oss", "olmoe", "glm4_moe", "deepseek_v2")
VOCAB = 96


def make_config(arch: str, num_experts: int = 8, top_k: int = 2):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=top_k,
                  tie_word_embeddings=False)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=48, num_experts=num_experts,
                                 shared_expert_intermediate_size=64, norm_topk_prob=False, decoder_sparse_step=1,
                                 mlp_only_layers=[])
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=48, num_experts=num_experts,
                                 head_dim=16, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=num_experts)
    if arch == "deepseek_v3":
        common.pop("num_key_value_heads")
        return tf.DeepseekV3Config(**common, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                                   n_routed_experts=num_experts, n_shared_experts=1, n_group=4, topk_group=2,
                                   routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0,
                                   q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=16, rope_scaling=None)
    if arch == "gpt_oss":
        return tf.GptOssConfig(**common, intermediate_size=48, num_local_experts=num_experts, head_dim=16,
                               layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=48, num_experts=num_experts)
    if arch == "glm4_moe":
        return tf.Glm4MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=num_experts,
                                n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0, head_dim=16)
    if arch == "deepseek_v2":
        common["num_key_value_heads"] = 4
        return tf.DeepseekV2Config(**common, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=num_experts,
                                   n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    raise KeyError(arch)


def make_model(arch: str, seed: int = 0, **cfg):
    import transformers as tf

    torch.manual_seed(seed)
    config = make_config(arch, **cfg)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Random init leaves the routers at zeros in some classes and DeepSeek-V3's bias at zero: give them
        # values so the routing is not degenerate and the bias takes part in the choice.
        for name, p in model.named_parameters():
            if p.dim() >= 1 and (torch.count_nonzero(p) == 0 or name.endswith(("gate.weight", "router.weight"))):
                p.copy_(torch.randn_like(p) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand_like(b) * 0.1)
    return model.eval()


def make_inputs(seed: int, batch: int, seq: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def batch_slices(batch: int, world: int, ragged: bool = False):
    """Rank r's rows of the batch: equal slices, or (ragged) slices of different sizes."""
    if not ragged:
        assert batch % world == 0, (batch, world)
        n = batch // world
        return [(r * n, (r + 1) * n) for r in range(world)]
    assert batch >= 2 * world, (batch, world)
    sizes = [batch // world] * world
    sizes[-1] += batch % world
    sizes[0] += 1  # rank 0 one sequence more, the last rank one less
    sizes[-1] -= 1
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out


def param_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


# ---- the one-process emulation ----

class _Meeting:
    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=120)
        self.inputs = [None] * world
        self.outputs = [None] * world


_tls = threading.local()
EMULATION = "moedist_emulation"


def _emulated_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    meet, rank, wire = _tls.meeting, _tls.rank, _tls.wire
    meet.inputs[rank] = (self, hidden_states, top_k_index, top_k_weights)
    meet.barrier.wait()
    if rank == 0:
        _emulate_layer(meet, wire)
    meet.barrier.wait()
    return meet.outputs[rank]


def emulate_moe(xs, ids, ws, expert_fn, *, wire=torch.bfloat16, quant_mode=0, shared=None, num_experts=None):
    """What moedist's dispatch -> experts -> combine computes for every rank, in plain torch.

    xs[r] (T_r, H), ids[r] (T_r, K), ws[r] (T_r, K): rank r's tokens; expert_fn(g, rows) runs global expert g
    on its rows (in the model's dtype); shared[r]: optional (T_r, H) added unweighted. quant_mode 2: each
    row quantized per token as dispatch does (float32 of the wire value, m = 127 / max|x| in float32,
    q = round half to even (x * m), scale = 1 / m) and dequantized as q * scale in float32."""
    dtype = xs[0].dtype
    x_all = torch.cat(xs).to(wire)  # rank-major = moedist's (source rank, token) order
    if quant_mode == 2:
        xf = x_all.to(torch.float32)
        amax = xf.abs().amax(dim=-1, keepdim=True)
        # torch.div with tensors: a true float32 division (`127.0 / t` would be 127 * reciprocal(t))
        m = torch.div(torch.full_like(amax, 127.0), amax)
        x_in = (torch.round(xf * m) * torch.div(torch.ones_like(m), m)).to(dtype)
    else:
        x_in = x_all.to(dtype)
    ids_all = torch.cat([i.to(torch.int64) for i in ids])
    K = ids_all.shape[1]
    E = num_experts if num_experts is not None else int(ids_all.max()) + 1
    y = torch.zeros(ids_all.shape[0], K, x_all.shape[1], dtype=wire)  # expert output per (token, k)
    for g in range(E):
        tok, kk = torch.nonzero(ids_all == g, as_tuple=True)  # token ascending
        if tok.numel():
            y[tok, kk] = expert_fn(g, x_in[tok]).to(wire)
    outs, start = [], 0
    for r, x in enumerate(xs):
        T = x.shape[0]
        w = ws[r].to(torch.float32)
        acc = torch.zeros(T, x.shape[1], dtype=torch.float32)
        for k in range(K):
            acc = acc + w[:, k:k + 1] * y[start:start + T, k].to(torch.float32)  # product rounded, then add
        if shared is not None:
            acc = acc + shared[r].to(wire).to(torch.float32)
        outs.append(acc.to(wire).to(dtype))
        start += T
    return outs


def _emulate_layer(meet: _Meeting, wire):
    from moedist.hf import expert_forward

    module = meet.inputs[0][0]
    meet.outputs[:] = emulate_moe([i[1] for i in meet.inputs], [i[2] for i in meet.inputs],
                                  [i[3] for i in meet.inputs], lambda g, rows: expert_forward(module, g, rows),
                                  wire=wire, quant_mode=_tls.quant_mode, num_experts=module.num_experts)


def emulate_ep(model, input_ids: torch.Tensor, world: int, *, ragged: bool = False, wire=torch.bfloat16,
               quant_mode: int = 0):
    """Logits of every rank's slice (concatenated in rank order), as the EP run computes them."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EMULATION, _emulated_experts_forward)
    meet = _Meeting(world)
    slices = batch_slices(input_ids.shape[0], world, ragged)
    replicas = [copy.deepcopy(model) for _ in range(world)]
    for m in replicas:
        m.set_experts_implementation(EMULATION)
    out, errors = [None] * world, []

    def run(r):
        try:
            _tls.meeting, _tls.rank, _tls.wire, _tls.quant_mode = meet, r, wire, quant_mode
            a, b = slices[r]
            with torch.no_grad():
                out[r] = replicas[r](input_ids=input_ids[a:b], use_cache=False).logits
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            meet.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    return torch.cat(out)
