"""The Python surface in one process: signatures, custom operators and their fake shapes, DLPack outputs,
dtype/argument errors, the reference, ranks as threads, torch.compile with inductor."""
import gc
import inspect
import itertools
import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import moedist
import _scenarios as sc

# The signatures of torch_npu's npu_moe_distribute_dispatch_v2 and npu_moe_distribute_combine_v2, verbatim.
DISPATCH_SIG = (
    "(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales=None, x_active_mask=None, "
    "expert_scales=None, elastic_info=None, performance_info=None, group_tp='', tp_world_size=0, tp_rank_id=0, "
    "expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0, global_bs=0, "
    "expert_token_nums_type=1, comm_alg='', zero_expert_num=0, copy_expert_num=0, const_expert_num=0)")
COMBINE_SIG = (
    "(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep, ep_world_size, "
    "ep_rank_id, moe_expert_num, *, tp_send_counts=None, x_active_mask=None, expand_scales=None, "
    "shared_expert_x=None, elastic_info=None, ori_x=None, const_expert_alpha_1=None, const_expert_alpha_2=None, "
    "const_expert_v=None, performance_info=None, group_tp='', tp_world_size=0, tp_rank_id=0, expert_shard_type=0, "
    "shared_expert_num=1, shared_expert_rank_num=0, global_bs=0, comm_quant_mode=0, comm_alg='', zero_expert_num=0, "
    "copy_expert_num=0, const_expert_num=0)")


def test_signatures_are_torch_npus():
    assert str(inspect.signature(moedist.npu_moe_distribute_dispatch_v2)) == DISPATCH_SIG
    assert str(inspect.signature(moedist.npu_moe_distribute_combine_v2)) == COMBINE_SIG


def test_custom_operators_registered():
    d = torch.ops.moedist.npu_moe_distribute_dispatch_v2.default._schema
    c = torch.ops.moedist.npu_moe_distribute_combine_v2.default._schema
    assert [a.name for a in d.arguments] == list(inspect.signature(moedist.npu_moe_distribute_dispatch_v2).parameters)
    assert [a.name for a in c.arguments] == list(inspect.signature(moedist.npu_moe_distribute_combine_v2).parameters)
    assert len(d.returns) == 7 and len(c.returns) == 1


def test_exception_classes():
    assert issubclass(moedist.InvalidArgument, ValueError)
    assert issubclass(moedist.Unsupported, NotImplementedError)
    assert issubclass(moedist.TransportError, RuntimeError)
    assert issubclass(moedist.Timeout, moedist.TransportError)


# ---- fake shapes == real shapes ----

def _configs():
    """(world, overrides) over world sizes 1..5 and the features that change output shapes."""
    out = []
    for W, Sr, shared_num, L, K, BS, ragged in itertools.product(
            (1, 2, 3, 4, 5), (0, 1, 2), (1, 2), (1, 3), (1, 3), (0, 1, 5), (False, True)):
        if Sr >= W or (Sr and Sr % shared_num) or (not Sr and shared_num > 1) or K > L * (W - Sr):
            continue
        quant = 2 if (W + L + BS) % 2 else 0
        out.append((W, dict(Sr=Sr, shared_num=shared_num, L=L, K=K, BS=BS, ragged=ragged and BS > 1, quant=quant)))
    for W in (2, 4):  # TP: W global ranks, W/2 per EP group, one expert per MoE rank
        for Sr in range(W // 2):
            out.append((W, dict(tp=2, Sr=Sr, E=W // 2 - Sr, K=1, BS=3)))
    for W, removed, Sr, esr in ((3, [1], 0, None), (4, [0, 3], 1, None), (4, [2], 1, 0), (5, [4], 2, 1)):
        out.append((W, dict(removed=removed, Sr=Sr, elastic_Sr=esr, K=2, BS=4)))
        out.append((W, dict(elastic_noop=True, Sr=Sr, K=2, BS=4)))
    return out


CONFIGS = _configs()


@pytest.mark.timeout(120)
def test_fake_shapes_equal_reference_shapes():
    """For every configuration and rank: the shape function, the fake implementation (FakeTensorMode) and
    the meta device give the shapes and dtypes of the real (reference) outputs."""
    checked = 0
    for world, over in CONFIGS:
        c = sc.make_cfg(world, **over)
        callers = sc.calling_ranks(c)
        calls = [sc.dispatch_kwargs(c, g, sc.gen_inputs(c, g), "ep", "tp" if c["tp"] == 2 else "") for g in callers]
        ref = moedist.reference_dispatch_v2(calls)
        for kw, real in zip(calls, ref):
            s = moedist.dispatch_shapes(kw["x"].shape, kw["expert_ids"].shape, kw["ep_world_size"], kw["ep_rank_id"],
                                        kw["moe_expert_num"], has_elastic_info=kw["elastic_info"] is not None,
                                        tp_world_size=kw["tp_world_size"], shared_expert_num=kw["shared_expert_num"],
                                        shared_expert_rank_num=kw["shared_expert_rank_num"], global_bs=kw["global_bs"])
            assert [tuple(t.shape) for t in real] == [tuple(x) for x in s], (world, over, kw["ep_rank_id"])
            with FakeTensorMode() as mode:
                fk = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
                fake = sc.call(moedist.npu_moe_distribute_dispatch_v2, sc.DISPATCH_POSITIONAL, fk)
            mk = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            meta = sc.call(moedist.npu_moe_distribute_dispatch_v2, sc.DISPATCH_POSITIONAL, mk)
            for r, f, m in zip(real, fake, meta):
                assert (tuple(f.shape), f.dtype) == (tuple(r.shape), r.dtype), (world, over)
                assert (tuple(m.shape), m.dtype, m.device.type) == (tuple(r.shape), r.dtype, "meta")
            y = sc.expert(c, real[0], real[1])
            with FakeTensorMode() as mode:
                out = torch.ops.moedist.npu_moe_distribute_combine_v2(
                    mode.from_tensor(y), mode.from_tensor(kw["expert_ids"]), mode.from_tensor(real[2]),
                    mode.from_tensor(real[4]), mode.from_tensor(kw["expert_scales"]), "ep", c["W"], kw["ep_rank_id"],
                    c["E"], None, None, None, None, None, None, None, None, None, None, "", 0, 0, 0, 1, 0, 0, 0, "", 0, 0, 0)
            assert tuple(out.shape) == tuple(kw["x"].shape) and out.dtype == kw["x"].dtype
            checked += 1
    assert checked > 200, checked


# ---- errors ----

def _one_rank_call(**over):
    x = torch.randn(4, 16).bfloat16()
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]], dtype=torch.int32)
    kw = dict(x=x, expert_ids=ids, ep_world_size=1, ep_rank_id=0, moe_expert_num=4, expert_scales=torch.rand(4, 2))
    kw.update(over)
    return kw


def test_reference_errors_map_to_value_error_with_the_message():
    with pytest.raises(ValueError, match=r"expert_ids\[1\]\[0\]=9 out of range"):
        moedist.reference_dispatch_v2([_one_rank_call(expert_ids=torch.tensor([[0, 1], [9, 3], [1, 2], [3, 0]],
                                                                                dtype=torch.int32))])
    with pytest.raises(ValueError, match=r"expert_ids has dtype int64 \(must be int32\)"):
        moedist.reference_dispatch_v2([_one_rank_call(expert_ids=torch.zeros(4, 2, dtype=torch.int64))])
    with pytest.raises(ValueError, match=r"quant_mode=1 \(static quantization is not supported"):
        moedist.reference_dispatch_v2([_one_rank_call(quant_mode=1)])
    with pytest.raises(ValueError, match=r"x has dtype float64 \(moedist takes bfloat16"):
        moedist.reference_dispatch_v2([_one_rank_call(x=torch.randn(4, 16, dtype=torch.float64))])
    with pytest.raises(ValueError, match="unexpected keyword argument 'quant'"):
        moedist.reference_dispatch_v2([_one_rank_call(quant=2)])
    with pytest.raises(TypeError, match="expert_scales must be a torch.Tensor or None"):
        moedist.reference_dispatch_v2([_one_rank_call(expert_scales=[[1.0, 2.0]] * 4)])
    with pytest.raises(NotImplementedError, match="hierarchy"):
        el = torch.tensor([1, 1, 0, 4, 0, 0], dtype=torch.int32)
        moedist.reference_dispatch_v2([_one_rank_call(elastic_info=el, comm_alg="hierarchy")])


def test_unregistered_group_is_value_error():
    kw = _one_rank_call()
    with pytest.raises(ValueError, match='group "no-such-group" is not registered'):
        moedist.npu_moe_distribute_dispatch_v2(kw.pop("x"), kw.pop("expert_ids"), "no-such-group", 1, 0, 4, **{
            k: v for k, v in kw.items() if k not in ("ep_world_size", "ep_rank_id", "moe_expert_num")})


# ---- ranks as threads of this process (the ops release the GIL while they wait) ----

_thread_groups = set()


def _thread_group(name, world):
    if name not in _thread_groups:
        moedist.init_thread_group(name, world, timeout=30)
        _thread_groups.add(name)
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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("over", [dict(quant=2, smooth=True, Sr=1, mask="2d"), dict(Z=1, C=1, Q=1, K=3, dtype="fp16")],
                         ids=["quant-shared-mask", "special-fp16"])
def test_thread_ranks_match_reference(over):
    world = 3
    c = sc.make_cfg(world, **over)
    name = _thread_group(f"threads{world}", world)
    inputs = [sc.gen_inputs(c, g) for g in range(world)]
    calls = [sc.dispatch_kwargs(c, g, inputs[g], name, "") for g in range(world)]
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


@pytest.mark.timeout(60)
def test_outputs_are_owning_torch_tensors():
    name = _thread_group("solo-lifetime", 1)
    kw = _one_rank_call()
    outs = moedist.npu_moe_distribute_dispatch_v2(kw["x"], kw["expert_ids"], name, 1, 0, 4,
                                                  expert_scales=kw["expert_scales"])
    assert [t.dtype for t in outs] == [torch.bfloat16, torch.float32, torch.int32, torch.int64, torch.int32,
                                       torch.int32, torch.float32]
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in outs)
    keep = outs[0].clone()
    moedist.destroy_comm(name)
    _thread_groups.discard(name)
    gc.collect()
    assert torch.equal(outs[0], keep)  # still valid after the communicator is gone
    outs[0].add_(0)  # writable
    del outs
    gc.collect()


@pytest.mark.timeout(600)
def test_torch_compile_inductor_fullgraph():
    """fullgraph=True with the default backend (inductor, which compiles C++ kernels with the host
    compiler) around both ops on one rank; the compiled result equals eager bit for bit."""
    name = _thread_group("solo-compile", 1)
    c = sc.make_cfg(1, quant=2, smooth=True, BS=5, K=2, L=4)
    t = sc.gen_inputs(c, 0)
    args = (t["x"], t["expert_ids"], name, "", 1, 0, 0, 0, 0, c["E"], t["scales"], 2, t["expert_scales"], None)
    model = sc.MoeLayer()
    eager = model(*args)
    torch._dynamo.reset()
    cm = torch.compile(model, fullgraph=True)
    for _ in range(2):
        got = cm(*args)
        for e, g in zip(eager, got):
            assert torch.equal(e, g)


@pytest.mark.timeout(300)
def test_performance_info_under_torch_compile():
    """performance_info passes through torch.compile (fullgraph, aot_eager): the mutated argument traces,
    and the outputs equal eager's. One rank: it waits for nobody, so the tensor keeps its values."""
    name = _thread_group("solo-perf-compile", 1)
    c = sc.make_cfg(1, BS=4, K=2, L=2)
    t = sc.gen_inputs(c, 0)

    def f(x, ids, perf):
        return moedist.npu_moe_distribute_dispatch_v2(x, ids, name, 1, 0, c["E"], performance_info=perf)

    perf = torch.full((1,), 3, dtype=torch.int64)
    eager = f(t["x"], t["expert_ids"], perf)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(t["x"], t["expert_ids"], perf)
    rows = int(eager[4].max())  # rows past them (and assist entries past 3 * rows) are unspecified
    assert torch.equal(eager[0][:rows], got[0][:rows]) and torch.equal(eager[2][:3 * rows], got[2][:3 * rows])
    for i in (1, 3, 4, 5, 6):
        assert torch.equal(eager[i], got[i]), i
    assert perf.tolist() == [3]


def test_performance_info_on_another_device_is_refused():
    """The op adds into performance_info's memory, so it must be CPU memory; a tensor that reports another
    device (this machine has none: a tensor subclass stands in) is an InvalidArgument naming it."""

    class OnCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    t = torch.zeros(4, dtype=torch.int64).as_subclass(OnCuda)
    with pytest.raises(moedist.InvalidArgument, match=r"npu_moe_distribute_dispatch_v2: performance_info is a \(4,\) int64 "
                                                      r"tensor on device cuda:0 \(must be a contiguous \(ep_world_size,\) int64"):
        moedist._ops._performance_view(t, "npu_moe_distribute_dispatch_v2")
