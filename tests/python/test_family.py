"""The 2026 members of the operator family in one process (ranks as threads), bit for bit against the
reference: comm_alg fullmesh_v1 / fullmesh_v2, combine_add_rms_norm, and smooth scales after a scale-down
that removed every shared-expert rank."""
import threading

import pytest
import torch

import moedist
import _scenarios as sc

_groups = set()


def _group(name, world):
    if name not in _groups:
        moedist.init_thread_group(name, world, timeout=30)
        _groups.add(name)
    return name


def _threads(ranks, fn):
    out, errs = {}, []

    def body(r):
        try:
            out[r] = fn(r)
        except BaseException as e:  # noqa: BLE001
            errs.append((r, e))

    ts = [threading.Thread(target=body, args=(r,)) for r in ranks]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts), "a rank thread hung"
    if errs:
        raise errs[0][1]
    return [out[r] for r in ranks]


def _roundtrip(c, name, inputs=None):
    """dispatch + combine on the calling ranks, and the reference of both."""
    ranks = sc.calling_ranks(c)
    inputs = inputs or {g: sc.gen_inputs(c, g) for g in ranks}
    calls = [sc.dispatch_kwargs(c, g, inputs[g], name, "") for g in ranks]
    d = _threads(range(len(ranks)), lambda i: sc.call(moedist.npu_moe_distribute_dispatch_v2, sc.DISPATCH_POSITIONAL,
                                                      calls[i]))
    ref = moedist.reference_dispatch_v2(calls)
    ccalls = [sc.combine_kwargs(c, g, inputs[g], d[i], sc.expert(c, d[i][0], d[i][1]), name, "")
              for i, g in enumerate(ranks)]
    y = _threads(range(len(ranks)), lambda i: sc.call(moedist.npu_moe_distribute_combine_v2, sc.COMBINE_POSITIONAL,
                                                      ccalls[i]))
    return ranks, inputs, d, ref, y, ccalls


@pytest.mark.timeout(60)
@pytest.mark.parametrize("alg", ["fullmesh_v1", "fullmesh_v2"])
def test_fullmesh_v1_v2_give_fullmesh_results(alg):
    world = 3
    name = _group("family3", world)
    base = dict(quant=2, smooth=True, Sr=1, mask="2d")
    c0, c1 = sc.make_cfg(world, **base), sc.make_cfg(world, comm_alg=alg, **base)
    _, _, d0, _, y0, _ = _roundtrip(c0, name)
    ranks, _, d1, ref1, y1, _ = _roundtrip(c1, name)
    for i in range(len(ranks)):
        sc.check_dispatch(c1, d1[i], ref1[i], f"{alg} rank {i}")
        rows = int(d0[i][4][-1])
        assert torch.equal(d1[i][0][:rows], d0[i][0][:rows]) and torch.equal(d1[i][1][:rows], d0[i][1][:rows])
        assert torch.equal(y1[i], y0[i])


def _all_shared_ranks_removed(**over):
    # W=5: rank 0 (the only shared-expert rank) is removed; 4 MoE ranks with one expert each stay.
    return sc.make_cfg(5, Sr=1, L=1, K=2, quant=2, smooth=True, removed=[0], elastic_Sr=0, **over)


@pytest.mark.timeout(60)
def test_scale_down_without_shared_ranks_takes_the_scales_shape_as_created():
    c = _all_shared_ranks_removed()
    name = _group("family5", 5)
    ranks, inputs, d, ref, y, ccalls = _roundtrip(c, name)
    assert ranks == [1, 2, 3, 4]
    assert all(inputs[g]["scales"].shape == (5, 32) for g in ranks)  # (S + E, H) as created
    info = sc.elastic_info(c).tolist()
    assert info[:4] == [1, 4, 0, 4]
    for i in range(len(ranks)):
        sc.check_dispatch(c, d[i], ref[i], f"rank {ranks[i]}")
    yr = moedist.reference_combine_v2(ccalls)
    for i in range(len(ranks)):
        assert torch.equal(y[i], yr[i])

    # Which rows are used: row 0 (the removed shared expert's) changes nothing; row 1 + g is expert g's.
    changed = {g: dict(t, scales=t["scales"].clone()) for g, t in inputs.items()}
    for t in changed.values():
        t["scales"][0] = 1000.0
    _, _, d0, _, _, _ = _roundtrip(c, name, changed)
    for i in range(len(ranks)):
        n = int(d[i][3].sum())  # rows past the received count are unspecified
        assert torch.equal(d0[i][0][:n], d[i][0][:n]) and torch.equal(d0[i][1][:n], d[i][1][:n])
    for t in changed.values():
        t["scales"][1 + 3] = 1000.0  # expert 3 lives on compact rank 3 (original rank 4)
    _, _, d3, _, _, _ = _roundtrip(c, name, changed)
    rows = int(d[3][3].sum())
    assert rows > 0 and not torch.equal(d3[3][1][:rows], d[3][1][:rows])
    assert all(torch.equal(d3[i][1][:int(d[i][3].sum())], d[i][1][:int(d[i][3].sum())]) for i in range(3))


def _add_rms_norm_calls(c, ranks, inputs, d, name, seed=5):
    g = torch.Generator().manual_seed(seed)
    dt = sc.DTYPES[c["dtype"]]
    calls = []
    for i, r in enumerate(ranks):
        kw = sc.combine_kwargs(c, r, inputs[r], d[i], sc.expert(c, d[i][0], d[i][1]), name, "")
        bs = kw["expert_ids"].shape[0]
        kw["expand_idx"] = kw.pop("assist_info_for_combine")
        kw.pop("comm_alg")
        kw["residual_x"] = torch.randn(bs, 1, c["H"], generator=g).to(dt)
        kw["gamma"] = (torch.rand(c["H"], generator=g) + 0.5).to(dt)
        kw["norm_eps"] = 1e-5
        calls.append(kw)
    return calls


ADD_RMS_NORM_POSITIONAL = ("expand_x", "expert_ids", "expand_idx", "ep_send_counts", "expert_scales", "residual_x",
                           "gamma", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("over", [dict(quant=2, smooth=True, Sr=1), dict(mask="2d", dtype="fp16"),
                                  dict(Z=1, C=1, Q=1, K=3, mask="1d")], ids=["quant-shared", "mask2d-fp16", "special-mask1d"])
def test_combine_add_rms_norm_matches_reference(over):
    world = 3
    c = sc.make_cfg(world, **over)
    name = _group("family3", world)
    ranks, inputs, d, _, y_combine, _ = _roundtrip(c, name)
    calls = _add_rms_norm_calls(c, ranks, inputs, d, name)
    got = _threads(range(len(ranks)), lambda i: sc.call(moedist.npu_moe_distribute_combine_add_rms_norm,
                                                        ADD_RMS_NORM_POSITIONAL, calls[i]))
    ref = moedist.reference_combine_add_rms_norm(calls)
    dt = sc.DTYPES[c["dtype"]]
    for i in range(len(ranks)):
        y, rstd, x = got[i]
        bs = calls[i]["expert_ids"].shape[0]
        assert y.shape == (bs, 1, c["H"]) and x.shape == (bs, 1, c["H"]) and rstd.shape == (bs, 1, 1)
        assert y.dtype == dt and x.dtype == dt and rstd.dtype == torch.float32
        for a, b in zip(got[i], ref[i]):
            assert torch.equal(a, b)
        # Independently of the reference: x is combine_v2's output plus the residual, rounded once; rstd and
        # y follow the RMSNorm formula (float64 here, so within float32 / one dtype rounding).
        assert torch.equal(x[:, 0], (y_combine[i].float() + calls[i]["residual_x"][:, 0].float()).to(dt))
        xf = x[:, 0].double()
        want_rstd = torch.rsqrt(xf.pow(2).mean(-1) + 1e-5)
        assert torch.allclose(rstd[:, 0, 0].double(), want_rstd, rtol=1e-5)
        want_y = xf * want_rstd[:, None] * calls[i]["gamma"].double()
        assert torch.allclose(y[:, 0].double(), want_y, rtol=1e-2, atol=1e-2)


@pytest.mark.timeout(60)
def test_combine_add_rms_norm_rejects_bad_norm_arguments():
    c = sc.make_cfg(1)
    name = _group("family1", 1)
    ranks, inputs, d, _, _, _ = _roundtrip(c, name)
    base = _add_rms_norm_calls(c, ranks, inputs, d, name)[0]
    cases = [
        (dict(residual_x=base["residual_x"].float()), ValueError, "residual_x has dtype float32"),
        (dict(residual_x=base["residual_x"][:, :, :-1]), ValueError, "residual_x has shape"),
        (dict(gamma=base["gamma"][:-1]), ValueError, "gamma has shape"),
        (dict(norm_eps=float("nan")), ValueError, "norm_eps=nan"),
        (dict(activation_scale=torch.ones(1)), ValueError, "activation_scale is a reserved parameter"),
        (dict(out_dtype=1), ValueError, "out_dtype=1 is a reserved parameter"),
    ]
    for change, exc, text in cases:
        with pytest.raises(exc, match=text.replace("(", r"\(")):
            sc.call(moedist.npu_moe_distribute_combine_add_rms_norm, ADD_RMS_NORM_POSITIONAL, dict(base, **change))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("over", [dict(quant=2, smooth=True, Sr=1, mask="2d", Z=1, C=1, Q=1, K=3),
                                  dict(comm_alg="hierarchy", rps=2)], ids=["fullmesh-split", "hierarchy-whole"])
def test_split_phase_equals_the_one_call_ops(over):
    world = 4
    c = sc.make_cfg(world, **over)
    name = _group("family4", world)
    ranks, inputs, d, ref, y, ccalls = _roundtrip(c, name)

    def split_dispatch(i):
        kw = sc.dispatch_kwargs(c, ranks[i], inputs[ranks[i]], name, "")
        h = sc.call(moedist.dispatch_setup, sc.DISPATCH_POSITIONAL, kw)
        # another op on the group while the split is open is refused, naming the open one
        with pytest.raises(ValueError, match=r"split exchange \(dispatch_v2\) is still open"):
            sc.call(moedist.npu_moe_distribute_dispatch_v2, sc.DISPATCH_POSITIONAL, kw)
        return moedist.dispatch_teardown(h)

    if c["comm_alg"] == "hierarchy":  # runs whole in setup: nothing left open
        ds = _threads(range(len(ranks)), lambda i: moedist.dispatch_teardown(
            sc.call(moedist.dispatch_setup, sc.DISPATCH_POSITIONAL, sc.dispatch_kwargs(c, ranks[i], inputs[ranks[i]], name, ""))))
    else:
        ds = _threads(range(len(ranks)), split_dispatch)
    for i in range(len(ranks)):
        sc.check_dispatch(c, ds[i], ref[i], f"split rank {i}")
    ys = _threads(range(len(ranks)), lambda i: moedist.combine_teardown(
        sc.call(moedist.combine_setup, sc.COMBINE_POSITIONAL,
                sc.combine_kwargs(c, ranks[i], inputs[ranks[i]], ds[i], sc.expert(c, ds[i][0], ds[i][1]), name, ""))))
    for i in range(len(ranks)):
        assert torch.equal(ys[i], y[i])
    h = None
    with pytest.raises(TypeError):
        moedist.dispatch_teardown(h)
