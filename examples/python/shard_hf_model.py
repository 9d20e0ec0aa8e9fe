"""A transformers MoE model with its experts sharded over CPU processes by moedist.

Every process builds the same model (here random-init from a config with a fixed seed; from_pretrained
works the same way), then

    moedist.hf.shard_experts(model)                    # this rank keeps only its experts' weights
    logits = model(input_ids=my_slice).logits          # every rank runs its own slice of the batch

Rank 0 gathers the logits and compares them with the unsharded model run in one process (relative L2
error and top-1 agreement: the rows travel in bf16). With --bench N it also times N forward passes, EP
over the processes vs the one-process model, and where the EP time goes.

    python examples/python/shard_hf_model.py                              # Qwen2-MoE over 4 processes
    python examples/python/shard_hf_model.py --arch deepseek_v3 --world-size 2
    python examples/python/shard_hf_model.py --bench 10 --hidden 256 --experts 16 --top-k 4
"""
import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="qwen2_moe", choices=ARCHS)
    p.add_argument("--world-size", type=int, default=4, help="processes (the experts must divide evenly)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="sequences in the whole batch (split over the ranks)")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--wire", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--quant-mode", type=int, default=0, choices=(0, 2))
    p.add_argument("--bench", type=int, default=0,
                   help="time this many forward passes, EP and one process alternating (after 2 warm-up rounds)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_config(a):
    import transformers as tf

    h = a.hidden
    common = dict(vocab_size=a.vocab, hidden_size=h, num_hidden_layers=a.layers, num_attention_heads=4,
                  max_position_embeddings=max(128, a.seq), num_experts_per_tok=a.top_k, tie_word_embeddings=False)
    if a.arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, num_key_value_heads=2, intermediate_size=2 * h, moe_intermediate_size=h,
                                 num_experts=a.experts, shared_expert_intermediate_size=2 * h, mlp_only_layers=[])
    if a.arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, num_key_value_heads=2, intermediate_size=2 * h, moe_intermediate_size=h,
                                 num_experts=a.experts, head_dim=h // 4, mlp_only_layers=[])
    if a.arch == "mixtral":
        return tf.MixtralConfig(**common, num_key_value_heads=2, intermediate_size=h, num_local_experts=a.experts)
    return tf.DeepseekV3Config(**common, num_key_value_heads=4, intermediate_size=2 * h, moe_intermediate_size=h,
                               n_routed_experts=a.experts, n_shared_experts=1, n_group=min(4, a.experts),
                               topk_group=min(2, a.experts), first_k_dense_replace=0, q_lora_rank=h // 2,
                               kv_lora_rank=h // 4, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=h // 8,
                               rope_scaling=None)


def build_model(a):
    import transformers as tf

    torch.manual_seed(a.seed)
    model = tf.AutoModelForCausalLM.from_config(make_config(a))
    with torch.no_grad():  # give the zero-initialized routers values, so the routing is not degenerate
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or (p.dim() >= 1 and torch.count_nonzero(p) == 0):
                p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


def worker(rank, a, init_file):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import moedist.hf

    W = a.world_size
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    model = build_model(a)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(a.seed + 1))
    per = a.batch // W
    mine = ids[rank * per:(rank + 1) * per]
    full = None
    if rank == 0:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits  # the one-process result, before sharding

    # ---- the lines that make the model expert-parallel ----
    moedist.hf.shard_experts(model, wire_dtype=torch.bfloat16 if a.wire == "bf16" else torch.float16,
                             quant_mode=a.quant_mode, max_tokens_per_rank=None)
    with torch.no_grad():
        logits = model(input_ids=mine, use_cache=False).logits
    # ---------------------------------------------------------

    parts = [torch.empty_like(logits) for _ in range(W)]
    dist.all_gather(parts, logits.contiguous())
    if rank == 0:
        ep = torch.cat(parts)
        rel = float((ep - full).norm() / full.norm())
        top1 = float((ep.argmax(-1) == full.argmax(-1)).float().mean())
        n_local = moedist.hf.experts_modules(model)[0][1].gate_up_proj.shape[0]
        print(f"{a.arch}: {a.layers} MoE layers, {a.experts} experts (top-{a.top_k}), {n_local} per rank on "
              f"{W} processes, batch {a.batch}x{a.seq} tokens split over the ranks")
        print(f"EP logits vs one process: rel-L2 {rel:.2e}, top-1 agreement {top1 * 100:.2f} %")
        ok = rel <= 2e-2 and top1 >= 0.98
        print("matches the one-process model within bf16 rounding:", ok)

    if a.bench:
        spent = {"dispatch": 0.0, "experts": 0.0, "combine": 0.0}
        buf = moedist.hf.experts_modules(model)[0][1]._moedist_buffer

        def clock(key, fn):
            def wrapped(*args, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kw)
                finally:
                    spent[key] += time.perf_counter() - t0
            return wrapped

        buf.dispatch = clock("dispatch", buf.dispatch)
        buf.combine = clock("combine", buf.combine)
        moedist.hf._local_experts = clock("experts", moedist.hf._local_experts)

        base = build_model(a) if rank == 0 else None  # the unsharded model, run by rank 0 alone

        def ep_pass():
            with torch.no_grad():
                model(input_ids=mine, use_cache=False)

        def base_pass():
            with torch.no_grad():
                base(input_ids=ids, use_cache=False)

        # EP passes (all ranks) and one-process passes (rank 0, the others wait in a barrier) alternate,
        # so a change of the machine's load hits both alike.
        t_ep, t_1, t_n = [], [], []
        threads = os.cpu_count() or 1
        for i in range(a.bench + 2):
            if i == 2:
                for k in spent:
                    spent[k] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            ep_pass()
            t_ep.append(time.perf_counter() - t0)
            dist.barrier()
            if rank == 0:
                torch.set_num_threads(1)
                t0 = time.perf_counter()
                base_pass()
                t_1.append(time.perf_counter() - t0)
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                base_pass()
                t_n.append(time.perf_counter() - t0)
                torch.set_num_threads(1)
        t_ep_mean = statistics.mean(t_ep[2:])  # the phases below are means too
        t_ep = statistics.median(t_ep[2:])
        shares = {k: v / a.bench for k, v in spent.items()}
        rows = [None] * W
        dist.all_gather_object(rows, (t_ep, t_ep_mean, shares))
        if rank == 0:
            t1, tn = statistics.median(t_1[2:]), statistics.median(t_n[2:])
            t_max = max(r[0] for r in rows)
            avg = {k: statistics.mean(r[2][k] for r in rows) for k in spent}
            print(f"forward pass, {a.batch * a.seq} tokens (median of {a.bench}): EP over {W} processes "
                  f"{t_max * 1e3:.1f} ms (slowest rank); one process {t1 * 1e3:.1f} ms with 1 thread, "
                  f"{tn * 1e3:.1f} ms with {threads} threads")
            phases = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in avg.items())
            rest = statistics.mean(r[1] for r in rows) - sum(avg.values())
            print(f"EP time per rank and pass (means over passes and ranks): {phases}, rest of the model "
                  f"{rest * 1e3:.1f} ms")
        dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("run moedist success.")


def main(argv=None):
    a = parse_args(argv)
    if a.batch % a.world_size:
        raise SystemExit(f"--batch {a.batch} must be a multiple of --world-size {a.world_size}")
    fd, init_file = tempfile.mkstemp(prefix="moedist-hf-")
    os.close(fd)
    os.unlink(init_file)
    try:
        mp.spawn(worker, args=(a, init_file), nprocs=a.world_size, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


if __name__ == "__main__":
    main()
