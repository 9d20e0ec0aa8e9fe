"""moedist.hf.shard_experts on tiny random-init transformers models (Qwen2-MoE, Qwen3-MoE, Mixtral,
DeepSeek-V3: hidden 64, 2 MoE layers, 8 experts, top-2), expert-parallel over 2 and 4 worker processes,
every rank on its own slice of the batch, against the same float32 model in one process:
- within bf16 rounding of the one-process model (rel-L2 of the logits <= 1e-2, top-1 agreement >= 99 %);
- bit for bit equal to a one-process emulation with moedist's rounding (_hf_models.emulate_ep).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.24")

import _hf_models as hm  # noqa: E402

BATCH, SEQ = 8, 16


@pytest.fixture
def one_thread():
    # The workers compute with one intra-op thread; the references here do the same, so every dense
    # matmul takes the same path in both.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ep_logits(pools, world, arch, **over):
    res = pools.get(world).run("_hf_scenarios.hf_ep", timeout=150, arch=arch, batch=BATCH, seq=SEQ, **over)
    for r in res:
        assert r["implementation"] == "moedist"
        assert r["num_moe_modules"] == 2
        assert r["local_experts"] == [8 // world], r["local_experts"]  # the rank keeps its experts only
        assert r["same_each_pass"]
    return torch.cat([torch.from_numpy(r["logits"]) for r in res]), res


def _compare(ep, ref, emu):
    rel = float((ep - ref).norm() / ref.norm())
    top1 = float((ep.argmax(-1) == ref.argmax(-1)).float().mean())
    return rel, top1, torch.equal(ep, emu)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4], ids=["w2", "w4"])
@pytest.mark.parametrize("arch", hm.ARCHS)
def test_sharded_model_matches_one_process(pools, one_thread, arch, world):
    ep, res = _ep_logits(pools, world, arch)
    model = hm.make_model(arch, 0)
    for r in res:  # every rank built the very model built here
        assert r["checksum"] == hm.param_checksum(model)
    ids = hm.make_inputs(0, BATCH, SEQ)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    emu = hm.emulate_ep(model, ids, world)
    assert ep.shape == ref.shape == (BATCH, SEQ, hm.VOCAB)
    rel, top1, exact = _compare(ep, ref, emu)
    print(f"{arch} w{world}: rel-L2 {rel:.2e}, top-1 agreement {top1:.4f}, bit-exact vs emulation {exact}")
    assert rel <= 1e-2 and top1 >= 0.99, (rel, top1)
    assert exact, f"max |ep - emulation| = {(ep - emu).abs().max().item()}"
    # The emulation's rounding is visible: without it the logits differ, so the equality above says something.
    assert not torch.equal(emu, ref)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch,world,over", [
    ("qwen2_moe", 4, dict(ragged=True)),
    ("deepseek_v3", 2, dict(quant_mode=2)),
    ("mixtral", 4, dict(wire="fp16")),
    ("gpt_oss", 2, {}),
    ("olmoe", 2, {}),
    ("glm4_moe", 4, {}),
    ("deepseek_v2", 2, {}),
], ids=["qwen2_moe-w4-ragged", "deepseek_v3-w2-quant2", "mixtral-w4-fp16", "gpt_oss-w2", "olmoe-w2", "glm4_moe-w4",
        "deepseek_v2-w2"])
def test_sharded_model_variants(pools, one_thread, arch, world, over):
    ep, _ = _ep_logits(pools, world, arch, **over)
    model = hm.make_model(arch, 0)
    ids = hm.make_inputs(0, BATCH, SEQ)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    wire = torch.float16 if over.get("wire") == "fp16" else torch.bfloat16
    emu = hm.emulate_ep(model, ids, world, ragged=over.get("ragged", False), wire=wire,
                        quant_mode=over.get("quant_mode", 0))
    rel, top1, exact = _compare(ep, ref, emu)
    print(f"{arch} w{world} {over}: rel-L2 {rel:.2e}, top-1 agreement {top1:.4f}, bit-exact vs emulation {exact}")
    assert rel <= (2e-2 if over.get("quant_mode") else 1e-2) and top1 >= 0.99, (rel, top1)
    assert exact, f"max |ep - emulation| = {(ep - emu).abs().max().item()}"


@pytest.mark.timeout(60)
def test_shard_experts_refuses_a_model_without_experts():
    import moedist.hf

    with pytest.raises(ValueError, match="no experts module"):
        moedist.hf.shard_experts(torch.nn.Linear(4, 4), group="unused")


@pytest.mark.timeout(60)
def test_unsharded_modules_keep_their_own_forward(one_thread):
    # The registered implementation runs the module's eager forward for a module that was not sharded
    # (e.g. a second model sharing the configuration).
    import moedist.hf

    moedist.hf.register()
    model = hm.make_model("mixtral", 0)
    ids = hm.make_inputs(0, 2, 8)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        model.set_experts_implementation("moedist")
        via = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(eager, via)


@pytest.mark.timeout(300)
def test_shard_hf_model_example():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, os.path.join(root, "examples", "python", "shard_hf_model.py"),
                        "--world-size", "2", "--arch", "deepseek_v3", "--hidden", "64", "--batch", "4", "--seq", "16"],
                       capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, f"exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert "matches the one-process model within bf16 rounding: True" in lines, p.stdout
    assert lines[-1] == "run moedist success.", p.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", hm.ARCHS + hm.MORE_ARCHS)
def test_expert_forward_is_the_modules_own_math(one_thread, arch):
    # moedist.hf.expert_forward (what the ranks run on their rows) against the experts module's eager
    # forward with every token routed to one expert at weight 1, bit for bit.
    import moedist.hf

    model = hm.make_model(arch, 0)
    mods = moedist.hf.experts_modules(model)
    assert len(mods) == 2
    m = mods[0][1]
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    eager = type(m).forward.__wrapped__
    for e in range(m.num_experts):
        ids = torch.full((5, 1), e, dtype=torch.int64)
        with torch.no_grad():
            want = eager(m, x, ids, torch.ones(5, 1))
            got = moedist.hf.expert_forward(m, e, x)
        assert torch.equal(got, want), (arch, e)
