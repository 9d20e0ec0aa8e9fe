"""moedist.EpBuffer / EpMoE: dtypes, shapes, quant_mode 2, shared expert, grouped vs per-expert experts,
ProcessGroup arguments and the messages for wrong arguments. Ranks are threads of this process
(moedist.init_thread_group) except where a ProcessGroup is needed (worker processes). Results are
checked bit for bit against _hf_models.emulate_moe, plain torch with moedist's rounding."""
import itertools
import threading
import time

import pytest
import torch

import moedist
from _hf_models import emulate_moe

_names = itertools.count()


def run_ranks(world, fn):
    """fn(rank, group_name) on `world` threads; returns the results, re-raises the first error."""
    name = moedist.init_thread_group(f"layer_test_{next(_names)}", world, timeout=20)
    out, errors = [None] * world, []

    def go(r):
        try:
            out[r] = fn(r, name)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=go, args=(r,)) for r in range(world)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    moedist.destroy_comm(name)
    if errors:
        raise errors[0]
    return out


def make_data(world, E, K, lead, H, x_dtype, id_dtype, w_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = 1
    for d in lead:
        T *= d
    xs, ids, ws = [], [], []
    for _ in range(world):
        xs.append((torch.randn(*lead, H, generator=g) * 3).to(x_dtype))
        ids.append(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).reshape(*lead, K).to(id_dtype))
        ws.append(torch.rand(*lead, K, generator=g).to(w_dtype))
    return xs, ids, ws


def expert_fn(g, rows):
    # a nonlinear expert whose output depends on its id, in the rows' dtype
    return torch.tanh(rows * (0.25 + 0.125 * g)) * (g + 1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("x_dtype,id_dtype,w_dtype,lead,wire", [
    (torch.float32, torch.int64, torch.float32, (2, 3), None),
    (torch.bfloat16, torch.int64, torch.bfloat16, (5,), None),
    (torch.float16, torch.int32, torch.float16, (2, 2), None),
    (torch.float32, torch.int16, torch.float64, (4,), torch.float16),
    (torch.float64, torch.uint8, torch.float32, (1, 3, 2), torch.bfloat16),
], ids=["fp32-int64", "bf16-int64-bf16w", "fp16-int32", "fp32-int16-fp64w-fp16wire", "fp64-uint8-3d"])
@pytest.mark.parametrize("grouped", [False, True], ids=["per-expert", "grouped"])
def test_layer_matches_emulation(x_dtype, id_dtype, w_dtype, lead, wire, grouped):
    world, E, K, H = 2, 4, 2, 24
    xs, ids, ws = make_data(world, E, K, lead, H, x_dtype, id_dtype, w_dtype)

    def rank(r, name):
        buf = moedist.EpBuffer(name, E, rank=r, world_size=world, wire_dtype=wire)
        if grouped:
            def experts(recv_x, counts):
                assert counts.dtype == torch.int64 and int(counts.sum()) == recv_x.shape[0]
                parts = recv_x.split(counts.tolist())
                return torch.cat([expert_fn(buf.local_experts[e], p) for e, p in enumerate(parts)])
        else:
            experts = [(lambda g: (lambda t: expert_fn(g, t)))(g) for g in buf.local_experts]
        return buf(xs[r], ids[r], ws[r], experts)

    ys = run_ranks(world, rank)
    flat = lambda t, n: t.reshape(-1, n)  # noqa: E731
    ref = emulate_moe([flat(x, H) for x in xs], [flat(i, K) for i in ids], [flat(w, K) for w in ws], expert_fn,
                      wire=wire or (x_dtype if x_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16),
                      num_experts=E)
    for r in range(world):
        assert ys[r].dtype == x_dtype and ys[r].shape == xs[r].shape
        assert torch.equal(ys[r], ref[r].reshape(xs[r].shape)), (ys[r] - ref[r].reshape(xs[r].shape)).abs().max()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("quant_mode", [0, 2])
@pytest.mark.parametrize("world", [2, 3])
def test_layer_shared_expert_and_quant(world, quant_mode):
    E, K, H, T = 2 * world, 3, 32, 7
    xs, ids, ws = make_data(world, E, K, (T,), H, torch.float32, torch.int64, torch.float32, seed=world)
    shared = lambda t: torch.sin(t) * 0.5  # noqa: E731
    seen = [None] * world

    def rank(r, name):
        buf = moedist.EpBuffer(name, E, rank=r, world_size=world, quant_mode=quant_mode)
        recv_x, counts, handle = buf.dispatch(xs[r], ids[r], ws[r])
        seen[r] = (recv_x.dtype, recv_x.shape[0], handle.num_rows, int(counts.sum()))
        parts = recv_x.split(counts.tolist())
        out = torch.cat([expert_fn(buf.local_experts[e], p) for e, p in enumerate(parts)])
        return buf.combine(out, handle, shared_expert_x=shared(xs[r]))

    ys = run_ranks(world, rank)
    ref = emulate_moe(xs, ids, ws, expert_fn, quant_mode=quant_mode, shared=[shared(x) for x in xs], num_experts=E)
    assert sum(s[1] for s in seen) == world * T * K  # every (token, k) reached exactly one expert row
    for r in range(world):
        assert seen[r][0] == torch.float32 and seen[r][1] == seen[r][2] == seen[r][3]
        assert torch.equal(ys[r], ref[r]), (ys[r] - ref[r]).abs().max()


@pytest.mark.timeout(120)
def test_ep_moe_module_and_active_mask():
    world, E, K, H, T = 2, 4, 2, 16, 6
    xs, ids, ws = make_data(world, E, K, (T,), H, torch.float32, torch.int64, torch.float32, seed=5)
    mask = torch.arange(T) < 4  # 1-D masks: the active tokens come first

    class Scale(torch.nn.Module):
        def __init__(self, g):
            super().__init__()
            self.g = g

        def forward(self, t):
            return expert_fn(self.g, t)

    def rank(r, name):
        first = r * (E // world)
        layer = moedist.EpMoE(name, E, [Scale(first + e) for e in range(E // world)], rank=r, world_size=world)
        return layer(xs[r], ids[r], ws[r], x_active_mask=mask)

    ys = run_ranks(world, rank)
    ref = emulate_moe(xs, ids, ws, expert_fn, num_experts=E)
    for r in range(world):
        assert torch.equal(ys[r][mask], ref[r][mask])
        assert torch.count_nonzero(ys[r][~mask]) == 0  # inactive tokens: zeros


@pytest.mark.timeout(60)
def test_wrong_arguments_get_clear_messages():
    name = moedist.init_thread_group(f"layer_test_{next(_names)}", 1)
    x = torch.randn(3, 8)
    ids = torch.zeros(3, 1, dtype=torch.int64)
    w = torch.ones(3, 1)
    with pytest.raises(TypeError, match=r"group_ep has type builtins\.float .*ProcessGroup"):
        moedist.npu_moe_distribute_dispatch_v2(x.bfloat16(), ids.int(), 1.5, 1, 0, 1)
    with pytest.raises(TypeError, match=r"group_tp has type builtins\.int"):
        moedist.npu_moe_distribute_combine_v2(x.bfloat16(), ids.int(), ids.int(), ids.int(), w, name, 1, 0, 1,
                                              group_tp=0)
    with pytest.raises(TypeError, match="group has type builtins.int"):
        moedist.EpBuffer(7, 4, rank=0, world_size=1)
    with pytest.raises(ValueError, match="rank= and world_size="):
        moedist.EpBuffer(name, 4)
    with pytest.raises(ValueError, match="num_experts=3 .*multiple of world_size=2"):
        moedist.EpBuffer(name, 3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="wire_dtype"):
        moedist.EpBuffer(name, 1, rank=0, world_size=1, wire_dtype=torch.float32)
    buf = moedist.EpBuffer(name, 1, rank=0, world_size=1)
    with pytest.raises(ValueError, match="topk_ids has dtype float32"):
        buf.dispatch(x, ids.float(), w)
    with pytest.raises(ValueError, match=r"topk_ids holds 4294967296"):
        buf.dispatch(x, ids + 2 ** 32, w)
    with pytest.raises(ValueError, match="topk_weights has shape"):
        buf.dispatch(x, ids, w[:2])
    with pytest.raises(ValueError, match="topk_ids has shape"):
        buf.dispatch(x, ids[:2], w[:2])
    with pytest.raises(ValueError, match=r"expert_ids\[0\]\[0\]=5 out of range"):
        buf.dispatch(x, ids + 5, w)  # the operator's own check, with the int64 ids cast to int32
    recv_x, counts, handle = buf.dispatch(x, ids, w)
    assert recv_x.shape == (3, 8) and counts.tolist() == [3]
    with pytest.raises(ValueError, match=r"expert_out .* rows >= 3"):
        buf.combine(recv_x[:2], handle)
    with pytest.raises(TypeError, match="handle has type"):
        buf.combine(recv_x, (1, 2))
    y = buf.combine(recv_x, handle)
    assert torch.equal(y, x.bfloat16().float())
    with pytest.raises(ValueError, match="already combined"):
        buf.combine(recv_x, handle)
    moedist.destroy_comm(name)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_process_group_arguments(pools, world):
    for r in pools.get(world).run("_hf_scenarios.layer_process_group"):
        assert r["same_layer"] and r["same_dispatch"] and r["combine_ok"], r
        assert r["dtype"] == "torch.float32"
        assert "group_ep has type builtins.float" in r["type_error"] and "ProcessGroup" in r["type_error"]


@pytest.mark.timeout(120)
def test_token_counts_that_differ_between_ranks():
    world, E, K, H = 2, 4, 2, 16
    counts = [3, 5]
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(t, H, generator=g) for t in counts]
    ids = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) for t in counts]
    ws = [torch.rand(t, K, generator=g) for t in counts]

    def bounded(r, name):
        buf = moedist.EpBuffer(name, E, rank=r, world_size=world, max_tokens_per_rank=5)
        return buf(xs[r], ids[r], ws[r], lambda recv, n: torch.cat(
            [expert_fn(buf.local_experts[e], p) for e, p in enumerate(recv.split(n.tolist()))]))

    ys = run_ranks(world, bounded)
    ref = emulate_moe(xs, ids, ws, expert_fn, num_experts=E)
    for r in range(world):
        assert torch.equal(ys[r], ref[r])

    def unbounded(r, name):  # the default assumes equal counts: every rank learns that they differ
        buf = moedist.EpBuffer(name, E, rank=r, world_size=world)
        try:
            buf(xs[r], ids[r], ws[r], [lambda t: t] * (E // world))
        except ValueError as e:
            return str(e)
        return None

    for msg in run_ranks(world, unbounded):
        assert msg is not None and "BS" in msg and "max_tokens_per_rank" in msg, msg

    def too_many(r, name):  # rank 1 is over the bound: it raises, and its peer fails at once naming it
        buf = moedist.EpBuffer(name, E, rank=r, world_size=world, max_tokens_per_rank=4)
        start = time.monotonic()
        try:
            buf.dispatch(xs[r], ids[r], ws[r])
            raised, msg = None, ""
        except Exception as e:  # noqa: BLE001
            raised, msg = e, str(e)
        return raised, msg, time.monotonic() - start

    res = run_ranks(world, too_many)
    assert isinstance(res[1][0], ValueError) and "5 tokens (more than max_tokens_per_rank=4)" in res[1][1], res
    assert isinstance(res[0][0], RuntimeError) and "rank 1" in res[0][1], res
    assert all(waited < 10 for _, _, waited in res), res  # not the group's 20 s deadline


@pytest.mark.timeout(120)
def test_a_rank_that_refuses_its_arguments_tells_its_peers():
    world, E, T, H = 3, 3, 4, 8

    def rank(r, name):
        buf = moedist.EpBuffer(name, E, rank=r, world_size=world)
        x, w = torch.randn(T, H), torch.rand(T, 1)
        ids = torch.randint(0, E, (T, 1))
        try:
            buf(x, ids.float() if r == 2 else ids, w, [lambda t: t])
        except Exception as e:  # noqa: BLE001
            return type(e).__name__, str(e)
        return None, ""

    res = run_ranks(world, rank)  # the group's timeout is 20 s; the peers fail at once instead
    assert res[2][0] == "ValueError" and "topk_ids has dtype float32" in res[2][1]
    for kind, msg in res[:2]:
        assert kind in ("TransportError", "RuntimeError") and "rank 2 rejected its call" in msg, (kind, msg)
        assert "topk_ids" in msg


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_that_refuses_its_arguments_with_auto_token_counts(pools, world):
    res = pools.get(world).run("_hf_scenarios.layer_peer_rejects", bad_rank=1)
    for r, x in enumerate(res):
        assert x["after_ok"], x
        if r == 1:
            assert x["raised"] == "ValueError" and "topk_ids has dtype float32" in x["message"], x
        else:
            assert x["raised"] == "TransportError" and "rank 1 rejected its call" in x["message"], x
            assert x["waited"] < 10, x
