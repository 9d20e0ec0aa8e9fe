"""The eager path: for plain CPU tensors the public functions hand their arguments straight to the C++
entry points (no torch.library dispatch, no Python-side checks); anything else takes the checked path
(Python checks, the torch.library operator). Both give the reference's outputs bit for bit, and
torch.compile(fullgraph=True) of dispatch + combine gives eager's."""
import enum
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moedist
from moedist import _ops
import _scenarios as sc

_groups = set()


def _group(name, world):
    if name not in _groups:
        moedist.init_thread_group(name, world, timeout=30)
        _groups.add(name)
    return name


def _run_threads(world, fn):
    out, errs = [None] * world, []

    def body(r):
        try:
            out[r] = fn(r)
        except BaseException as e:  # noqa: BLE001
            errs.append((r, e))

    ts = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts), "a rank thread hung"
    if errs:
        raise errs[0][1]
    return out


@pytest.fixture
def checked_calls(monkeypatch):
    """The ops the checked path ran (the eager path never calls _checked)."""
    calls = []
    real = _ops._checked

    def spy(op, args):
        calls.append(op)
        return real(op, args)

    monkeypatch.setattr(_ops, "_checked", spy)
    return calls


@pytest.mark.timeout(120)
@pytest.mark.parametrize("over", [dict(quant=2, smooth=True, Sr=1, mask="2d"),
                                  dict(Z=1, C=1, Q=1, K=3, dtype="fp16", shared_x=True),
                                  dict(mask="1d", noncontig=True)],
                         ids=["quant-shared-mask", "special-fp16", "noncontig"])
def test_eager_path_matches_reference(over, checked_calls):
    world = 3
    c = sc.make_cfg(world, **over)
    name = _group("eager3", world)
    inputs = [sc.gen_inputs(c, g) for g in range(world)]
    calls = [sc.dispatch_kwargs(c, g, inputs[g], name, "") for g in range(world)]
    if c["noncontig"]:
        calls = [sc.make_noncontig(kw, ("x", "expert_ids", "expert_scales", "x_active_mask")) for kw in calls]
        assert not calls[0]["x"].is_contiguous()
    d = _run_threads(world, lambda r: sc.call(moedist.npu_moe_distribute_dispatch_v2, sc.DISPATCH_POSITIONAL, calls[r]))
    ref = moedist.reference_dispatch_v2(calls)
    for r in range(world):
        sc.check_dispatch(c, d[r], ref[r], f"thread rank {r}")
    ccalls = [sc.combine_kwargs(c, g, inputs[g], d[g], sc.expert(c, d[g][0], d[g][1]), name, "") for g in range(world)]
    y = _run_threads(world, lambda r: sc.call(moedist.npu_moe_distribute_combine_v2, sc.COMBINE_POSITIONAL, ccalls[r]))
    rcalls = [sc.combine_kwargs(c, g, inputs[g], ref[g], sc.expert(c, ref[g][0], ref[g][1]), name, "")
              for g in range(world)]
    yr = moedist.reference_combine_v2(rcalls)
    for r in range(world):
        assert torch.equal(y[r], yr[r])
    assert checked_calls == [], "plain CPU tensors took the checked path"


class _Sub(torch.Tensor):
    pass


class _One(enum.IntEnum):
    ONE = 1


class _Name(str):
    pass


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _solo_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(6)]).to(torch.int32)
    w = torch.rand(6, 2, generator=g)
    return x, ids, w


def _same_dispatch(a, b, ids):
    """Equal where dispatch's outputs are specified: expand_x up to the received rows, assist_info_for_combine
    up to 3 * own rows (one rank: every row is its own), the rest whole."""
    rows, own = int(a[3].sum()), ids.numel()
    assert torch.equal(a[0][:rows].detach(), b[0][:rows].detach())
    assert torch.equal(a[1][:rows], b[1][:rows])
    assert torch.equal(a[2][:3 * own], b[2][:3 * own])
    for i in (3, 4, 5, 6):
        assert torch.equal(a[i], b[i]), i


def _round(x, ids, w, name, world=1, *, mode=None):
    """dispatch + combine of expert outputs 2 * expand_x on a 1-rank group."""
    D, C = moedist.npu_moe_distribute_dispatch_v2, moedist.npu_moe_distribute_combine_v2
    if mode is not None:
        with mode:
            d = D(x, ids, name, world, 0, 4, expert_scales=w)
            return d, C(d[0] * 2, ids, d[2], d[4], w, name, world, 0, 4)
    d = D(x, ids, name, world, 0, 4, expert_scales=w)
    return d, C(d[0] * 2, ids, d[2], d[4], w, name, world, 0, 4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["requires_grad", "subclass", "int_subclass", "str_subclass", "dispatch_mode"])
def test_other_inputs_take_the_checked_path_with_the_same_results(variant, checked_calls):
    name = _group("eager-solo", 1)
    x, ids, w = _solo_inputs()
    d0, y0 = _round(x, ids, w, name)
    assert checked_calls == []
    xv, wv, world, grp, mode = x, w, 1, name, None
    if variant == "requires_grad":
        wv = w.clone().requires_grad_()
    elif variant == "subclass":
        xv = x.as_subclass(_Sub)
    elif variant == "int_subclass":
        world = _One.ONE
    elif variant == "str_subclass":
        grp = _Name(name)
    else:
        mode = _PassThrough()
    d1, y1 = _round(xv, ids, wv, grp, world, mode=mode)
    assert checked_calls == [_ops._DISPATCH, _ops._COMBINE], checked_calls
    _same_dispatch(d0, d1, ids)
    assert torch.equal(y0, y1.detach())


@pytest.mark.timeout(120)
def test_backward_through_the_ops_is_an_error_not_a_silent_zero():
    """The ops have no derivative: with inputs that require grad the outputs are the usual ones, and a
    backward pass through them raises, naming the operator, rather than leaving a gradient of None behind
    with a warning (what torch does for an operator without an autograd kernel)."""
    name = _group("eager-solo", 1)
    x, ids, w = _solo_inputs()
    d0, y0 = _round(x, ids, w, name)
    wv = w.clone().requires_grad_()
    d = moedist.npu_moe_distribute_dispatch_v2(x, ids, name, 1, 0, 4, expert_scales=wv)
    y = moedist.npu_moe_distribute_combine_v2(d[0] * 2, ids, d[2], d[4], wv, name, 1, 0, 4)
    assert y.requires_grad and torch.equal(y.detach(), y0)
    _same_dispatch(d0, tuple(t.detach() for t in d), ids)
    with pytest.raises(RuntimeError, match="moedist::npu_moe_distribute_combine_v2 has no derivative"):
        y.float().sum().backward()
    with pytest.raises(RuntimeError, match="moedist::npu_moe_distribute_dispatch_v2 has no derivative"):
        d[6].sum().backward()  # expand_scales, from expert_scales
    assert wv.grad is None
    with torch.no_grad():  # no graph: outputs that do not require grad
        y1 = moedist.npu_moe_distribute_combine_v2(d0[0] * 2, ids, d0[2], d0[4], wv, name, 1, 0, 4)
    assert not y1.requires_grad and torch.equal(y1, y0)


@pytest.mark.timeout(60)
def test_eager_path_errors_are_the_checked_paths():
    """What the eager path does not take (here a float64 x, a list, a meta tensor) raises what it raised before."""
    name = _group("eager-solo", 1)
    x, ids, w = _solo_inputs()
    D = moedist.npu_moe_distribute_dispatch_v2
    with pytest.raises(ValueError, match="x has dtype float64"):
        D(x.double(), ids, name, 1, 0, 4)
    with pytest.raises(TypeError, match="expert_scales must be a torch.Tensor or None"):
        D(x, ids, name, 1, 0, 4, expert_scales=w.tolist())
    with pytest.raises(ValueError, match="x is a meta tensor"):
        D(x.to("meta"), ids, name, 1, 0, 4)
    with pytest.raises(TypeError, match="ep_rank_id must be an int"):
        D(x, ids, name, 1, 0.0, 4)
    with pytest.raises(ValueError, match="not registered"):  # the core's own errors come through the eager path
        D(x, ids, "no-such-group", 1, 0, 4)


@pytest.mark.timeout(600)
def test_compiled_dispatch_combine_equals_eager(checked_calls):
    """torch.compile(fullgraph=True) of a function calling dispatch, an expert and combine: the compiled
    calls (through the torch.library operators) give the eager path's results bit for bit."""
    name = _group("eager-solo", 1)
    x, ids, w = _solo_inputs()

    def layer(x, ids, w):
        d = moedist.npu_moe_distribute_dispatch_v2(x, ids, name, 1, 0, 4, expert_scales=w)
        y = moedist.npu_moe_distribute_combine_v2(d[0] * 2, ids, d[2], d[4], w, name, 1, 0, 4)
        return y, d[3], d[4]

    eager = layer(x, ids, w)
    assert checked_calls == []
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        got = compiled(x, ids, w)
        for e, g in zip(eager, got):
            assert torch.equal(e, g)


@pytest.mark.timeout(300)
def test_python_bench_driver_prints_one_row_per_configuration():
    """bench/python_bench.py, which `moedist bench --python` runs: 2 ranks as processes, two configurations."""
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "python_bench.py")
    out = subprocess.run([sys.executable, script, "--ranks", "2", "--tokens", "1,3", "--hidden", "64", "--experts", "4",
                          "--quant", "0", "--topk", "2", "--iters", "3", "--warmup", "1", "--timeout", "240"],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    rows = [line.split(" ", 8) for line in out.stdout.splitlines() if line.startswith("PYROW ")]
    assert [r[1:8] for r in rows] == [["2", "1", "64", "4", "0", "0", "fullmesh"], ["2", "3", "64", "4", "0", "0", "fullmesh"]]
    for r in rows:
        entry = json.loads(r[8])
        for k in ("dispatch_us", "combine_us", "round_us"):
            assert 0 < entry[k]["p10"] <= entry[k]["median"] <= entry[k]["p90"], entry


@pytest.mark.timeout(300)
def test_python_calls_script_times_every_path():
    """bench/python_calls.py (the per-call figures of docs/perf.md): every path it times runs, the torch.library
    operators called with their full argument lists included."""
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "python_calls.py")
    out = subprocess.run([sys.executable, script, "--tokens", "2", "--hidden", "64", "--experts", "4", "--topk", "2",
                          "--iters", "10", "--rounds", "2", "--warmup", "1", "--backend", "aot_eager"],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for k in ("dispatch_cpp_us", "dispatch_eager_us", "dispatch_operator_us", "combine_cpp_us", "combine_eager_us",
              "combine_operator_us", "layer_eager_us", "layer_compiled_aot_eager_us"):
        assert 0 < res[k]["p10"] <= res[k]["median"], (k, res)
    assert res["dispatch_added_us"] == round(res["dispatch_eager_us"]["median"] - res["dispatch_cpp_us"]["median"], 2)
