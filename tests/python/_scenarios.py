"""Scenarios that the worker processes of _cluster.py run, every rank the same one.

Inputs are a deterministic function of (configuration, global rank), so every worker can rebuild every
rank's call and check its own distributed outputs against moedist's reference of the whole step, bit for
bit: expand_x rows up to the received count, assist_info_for_combine up to 3 * own rows (the rest is
unspecified), every other output whole; then combine, whose expert outputs are computed the same way on
the reference's dispatch outputs. The output shapes are also checked against the fake implementation's.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import moedist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

DISPATCH_POSITIONAL = ("x", "expert_ids", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num")
COMBINE_POSITIONAL = ("expand_x", "expert_ids", "assist_info_for_combine", "ep_send_counts", "expert_scales",
                      "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num")


class Ctx:
    """Per-worker state: rank, world size and the communicators built so far (by key)."""

    def __init__(self, rank: int, world: int):
        self.rank = rank
        self.world = world
        self.comms = {}

    def comm(self, key: str, partition, **kw) -> str:
        """Collectively creates a gloo group for every rank list of `partition` (all ranks call
        dist.new_group for each, as torch requires) and returns moedist's name for this rank's group."""
        kw.setdefault("timeout", 20)  # a hang surfaces as moedist.Timeout before the harness gives up
        if key not in self.comms:
            mine = None
            for ranks in partition:
                pg = dist.new_group(ranks=list(ranks), backend="gloo")
                if self.rank in ranks:
                    mine = pg
            self.comms[key] = moedist.get_comm_name(mine, self.rank, **kw)
        return self.comms[key]


# ---- configuration ----

DEFAULTS = dict(dtype="bf16", L=2, E=None, K=2, BS=6, H=32, Sr=0, shared_num=1, quant=0, smooth=False, mask=None,
                Z=0, C=0, Q=0, tp=0, removed=None, elastic_Sr=None, elastic_noop=False, noncontig=False, ragged=False,
                etn_type=1, comm_quant=0, comm_alg="", rps=0, shared_x=False, weights=True, seed=0)


def make_cfg(world: int, **over) -> dict:
    c = dict(DEFAULTS)
    unknown = set(over) - set(c)
    if unknown:
        raise KeyError(f"unknown configuration keys {sorted(unknown)}")
    c.update(over)
    c["world"] = world
    c["tpn"] = 2 if c["tp"] == 2 else 1
    c["W"] = world // c["tpn"]
    if c["E"] is None:
        c["E"] = c["L"] * (c["W"] - c["Sr"])
    c["L"] = c["E"] // (c["W"] - c["Sr"])
    c["S"] = c["shared_num"] if c["Sr"] > 0 else 0
    # elastic scale-down: the removed ranks do not call; L stays the same
    if c["removed"]:
        active = [r for r in range(c["W"]) if r not in c["removed"]]
        srl = c["Sr"] if c["elastic_Sr"] is None else c["elastic_Sr"]
        c["active"] = active
        c["Wl"], c["Srl"], c["El"] = len(active), srl, c["L"] * (len(active) - srl)
    else:
        c["active"] = list(range(c["W"]))
    return c


def elastic_info(c):
    """elastic_info as torch_npu's combine_v2 documentation builds it: [is_elastic, W', Sr', E', T1[W], T2[W]]."""
    if not c["removed"] and not c["elastic_noop"]:
        return None
    W = c["W"]
    info = torch.full((4 + 2 * W,), -1, dtype=torch.int32)
    if not c["removed"]:
        info[:4] = torch.tensor([0, W, c["Sr"], c["E"]], dtype=torch.int32)
        info[4:4 + W] = torch.arange(W, dtype=torch.int32)
        info[4 + W:] = torch.arange(W, dtype=torch.int32)
        return info
    info[:4] = torch.tensor([1, c["Wl"], c["Srl"], c["El"]], dtype=torch.int32)
    for local, ep in enumerate(c["active"]):
        info[4 + ep] = local
        info[4 + W + local] = ep
    return info


def topology(c, g: int):
    """(ep_rank, tp_rank) of global rank g, as in torch_npu's combine_v2 documentation: ep = g // tp, tp = g % tp."""
    return g // c["tpn"], g % c["tpn"]


def bs_of(c, ep_rank: int) -> int:
    return max(1, c["BS"] - ep_rank % 3) if c["ragged"] else c["BS"]


def gen_inputs(c, g: int) -> dict:
    """Every tensor of global rank g's calls (contiguous)."""
    gen = torch.Generator().manual_seed(1000 * c["seed"] + g)
    ep_rank, _ = topology(c, g)
    dt = DTYPES[c["dtype"]]
    BS, H, K = bs_of(c, ep_rank), c["H"], c["K"]
    e_moe = c["El"] if c["removed"] else c["E"]
    valid = list(range(e_moe)) + list(range(c["E"], c["E"] + c["Z"] + c["C"] + c["Q"]))
    assert K <= len(valid), (K, valid)
    pick = [torch.randperm(len(valid), generator=gen)[:K] for _ in range(BS)]
    ids = torch.tensor([[valid[int(i)] for i in p] for p in pick], dtype=torch.int32).reshape(BS, K)
    t = dict(
        x=(torch.randn(BS, H, generator=gen) * 2).to(dt),
        expert_ids=ids,
        expert_scales=torch.rand(BS, K, generator=gen),
    )
    if c["mask"] == "1d":
        n = int(torch.randint(0, BS + 1, (1,), generator=gen))
        t["x_active_mask"] = torch.arange(BS) < n
    elif c["mask"] == "2d":
        t["x_active_mask"] = torch.rand(BS, K, generator=gen) < 0.7
    if c["smooth"]:
        t["scales"] = torch.rand(c["S"] + c["E"], H, generator=gen) + 0.5
    if c["Q"]:
        t["const_expert_alpha_1"] = torch.empty(c["Q"]).uniform_(-1, 1, generator=gen).to(dt)
        t["const_expert_alpha_2"] = torch.empty(c["Q"]).uniform_(-1, 1, generator=gen).to(dt)
        t["const_expert_v"] = torch.empty(c["Q"], H).uniform_(-1, 1, generator=gen).to(dt)
    if c["shared_x"]:
        t["shared_expert_x"] = torch.randn(BS, H, generator=gen).to(dt)
    return t


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout: a transposed copy (2-D) or a strided slice (1-D)."""
    if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1:
        out = t.t().contiguous().t()
    else:
        wide = torch.zeros((t.shape[0] * 2,) + tuple(t.shape[1:]), dtype=t.dtype)
        wide[::2] = t
        out = wide[::2]
    assert torch.equal(out, t)
    return out


def dispatch_kwargs(c, g: int, t: dict, group_ep: str, group_tp: str) -> dict:
    ep_rank, tp_rank = topology(c, g)
    return dict(
        x=t["x"], expert_ids=t["expert_ids"], group_ep=group_ep, ep_world_size=c["W"], ep_rank_id=ep_rank,
        moe_expert_num=c["E"], scales=t.get("scales"), x_active_mask=t.get("x_active_mask"),
        expert_scales=t["expert_scales"] if c["weights"] else None, elastic_info=elastic_info(c),
        group_tp=group_tp, tp_world_size=c["tp"], tp_rank_id=tp_rank, shared_expert_num=c["shared_num"],
        shared_expert_rank_num=c["Sr"], quant_mode=c["quant"], global_bs=c["BS"] * c["W"] if c["ragged"] else 0,
        expert_token_nums_type=c["etn_type"], comm_alg=c["comm_alg"], zero_expert_num=c["Z"],
        copy_expert_num=c["C"], const_expert_num=c["Q"])


def expert(c, expand_x: torch.Tensor, dynamic_scales: torch.Tensor) -> torch.Tensor:
    """The 'FFN': dequantize (quant_mode 2) or scale, then back to the token dtype; row-wise."""
    dt = DTYPES[c["dtype"]]
    if c["quant"] == 2:
        return (expand_x.to(torch.float32) * dynamic_scales[:, None]).to(dt)
    return (expand_x.to(torch.float32) * 1.5).to(dt)


def combine_kwargs(c, g: int, t: dict, d: tuple, y: torch.Tensor, group_ep: str, group_tp: str) -> dict:
    ep_rank, tp_rank = topology(c, g)
    _, _, assist, _, ep_recv, tp_recv, expand_scales = d
    return dict(
        expand_x=y, expert_ids=t["expert_ids"], assist_info_for_combine=assist, ep_send_counts=ep_recv,
        expert_scales=t["expert_scales"], group_ep=group_ep, ep_world_size=c["W"], ep_rank_id=ep_rank,
        moe_expert_num=c["E"], tp_send_counts=tp_recv, x_active_mask=t.get("x_active_mask"),
        expand_scales=expand_scales, shared_expert_x=t.get("shared_expert_x"), elastic_info=elastic_info(c),
        ori_x=t["x"] if (c["C"] or c["Q"]) else None, const_expert_alpha_1=t.get("const_expert_alpha_1"),
        const_expert_alpha_2=t.get("const_expert_alpha_2"), const_expert_v=t.get("const_expert_v"),
        group_tp=group_tp, tp_world_size=c["tp"], tp_rank_id=tp_rank, shared_expert_num=c["shared_num"],
        shared_expert_rank_num=c["Sr"], global_bs=c["BS"] * c["W"] if c["ragged"] else 0,
        comm_quant_mode=c["comm_quant"], comm_alg=c["comm_alg"], zero_expert_num=c["Z"], copy_expert_num=c["C"],
        const_expert_num=c["Q"])


def call(fn, positional, kw: dict):
    kw = dict(kw)
    args = [kw.pop(k) for k in positional]
    return fn(*args, **kw)


def make_noncontig(kw: dict, names) -> dict:
    kw = dict(kw)
    for n in names:
        if kw.get(n) is not None and kw[n].numel() > 1:
            kw[n] = noncontig(kw[n])
    return kw


def check_dispatch(c, got, ref, where: str) -> int:
    names = ("expand_x", "dynamic_scales", "assist_info_for_combine", "expert_token_nums", "ep_recv_counts",
             "tp_recv_counts", "expand_scales")
    for n, a, b in zip(names, got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {n} {tuple(a.shape)} {a.dtype} vs reference {tuple(b.shape)} {b.dtype}"
    if c["tp"] == 2:
        total = int(got[5].sum())
        own = int(got[5][int(c["_tp_rank"])])
    else:
        own = total = int(got[4].max()) if got[4].numel() else 0
    assert torch.equal(got[0][:total], ref[0][:total]), f"{where}: expand_x rows [0, {total}) differ from the reference"
    assert torch.equal(got[2][:3 * own], ref[2][:3 * own]), f"{where}: assist_info_for_combine[:{3 * own}] differs"
    for i in (1, 3, 4, 5, 6):
        assert torch.equal(got[i], ref[i]), f"{where}: {names[i]} differs from the reference:\n{got[i]}\n{ref[i]}"
    return total


def check_fake_shapes(c, kw: dict, got) -> None:
    s = moedist.dispatch_shapes(kw["x"].shape, kw["expert_ids"].shape, kw["ep_world_size"], kw["ep_rank_id"],
                                kw["moe_expert_num"], has_elastic_info=kw["elastic_info"] is not None,
                                tp_world_size=kw["tp_world_size"], shared_expert_num=kw["shared_expert_num"],
                                shared_expert_rank_num=kw["shared_expert_rank_num"], global_bs=kw["global_bs"])
    for n, want, t in zip(s._fields, s, got):
        assert tuple(t.shape) == tuple(want), f"{n}: real shape {tuple(t.shape)}, fake shape {tuple(want)}"


def groups_for(ctx: Ctx, c) -> tuple:
    """(group_ep, group_tp) names for this rank under configuration c."""
    N, tpn = c["world"], c["tpn"]
    if tpn == 2:
        W = c["W"]
        ep = ctx.comm("ep_tp2", [[x * 2 + i for x in range(W)] for i in range(2)])
        tp = ctx.comm("tp_tp2", [[2 * e, 2 * e + 1] for e in range(W)])
        return ep, tp
    if c["rps"]:
        return ctx.comm(f"world_rps{c['rps']}", [list(range(N))], ranks_per_server=c["rps"]), ""
    return ctx.comm("world", [list(range(N))]), ""


def calling_ranks(c):
    return [g for g in range(c["world"]) if topology(c, g)[0] in c["active"]]


# ---- scenarios ----

def roundtrip(ctx: Ctx, repeat: int = 1, **over) -> dict:
    """dispatch + expert + combine on every rank, checked against the reference (see the module doc)."""
    c = make_cfg(ctx.world, **over)
    group_ep, group_tp = groups_for(ctx, c)
    g = ctx.rank
    ep_rank, tp_rank = topology(c, g)
    c["_tp_rank"] = tp_rank
    if ep_rank not in c["active"]:
        return {"called": False}
    t = gen_inputs(c, g)
    kw = dispatch_kwargs(c, g, t, group_ep, group_tp)
    if c["noncontig"]:
        kw = make_noncontig(kw, ("x", "expert_ids", "expert_scales", "x_active_mask", "scales", "elastic_info"))
    for _ in range(repeat):
        d = call(moedist.npu_moe_distribute_dispatch_v2, DISPATCH_POSITIONAL, kw)
    check_fake_shapes(c, kw, d)

    callers = calling_ranks(c)
    inputs = {h: gen_inputs(c, h) for h in callers}
    ref_d = moedist.reference_dispatch_v2([dispatch_kwargs(c, h, inputs[h], "ref_ep", "ref_tp" if c["tpn"] == 2 else "")
                                           for h in callers], ranks_per_server=c["rps"])
    me = callers.index(g)
    rows = check_dispatch(c, d, ref_d[me], f"[rank {g}] dispatch")

    y = expert(c, d[0], d[1])
    ckw = combine_kwargs(c, g, t, d, y, group_ep, group_tp)
    if c["noncontig"]:
        ckw = make_noncontig(ckw, ("expand_x", "expert_ids", "expert_scales", "x_active_mask", "ori_x",
                                   "const_expert_v", "shared_expert_x"))
    for _ in range(repeat):
        out = call(moedist.npu_moe_distribute_combine_v2, COMBINE_POSITIONAL, ckw)
    ref_c = moedist.reference_combine_v2([
        combine_kwargs(c, h, inputs[h], ref_d[i], expert(c, ref_d[i][0], ref_d[i][1]), "ref_ep",
                       "ref_tp" if c["tpn"] == 2 else "") for i, h in enumerate(callers)], ranks_per_server=c["rps"])
    assert out.shape == (t["x"].shape[0], c["H"]) and out.dtype == t["x"].dtype
    assert torch.equal(out, ref_c[me]), f"[rank {g}] combine differs from the reference: max |diff| " \
                                        f"{(out.float() - ref_c[me].float()).abs().max()}"
    return {"called": True, "rows": rows, "A": d[0].shape[0]}


class MoeLayer(torch.nn.Module):
    """The graph-mode model of torch_npu's combine_v2 documentation: dispatch, 'expert', combine, with the arguments as inputs."""

    def forward(self, x, expert_ids, group_ep, group_tp, ep_world_size, tp_world_size, ep_rank_id, tp_rank_id,
                shared_expert_rank_num, moe_expert_num, scales, quant_mode, expert_scales, x_active_mask):
        expand_x, dynamic_scales, assist_info, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = \
            moedist.npu_moe_distribute_dispatch_v2(
                x=x, expert_ids=expert_ids, group_ep=group_ep, group_tp=group_tp, ep_world_size=ep_world_size,
                tp_world_size=tp_world_size, ep_rank_id=ep_rank_id, tp_rank_id=tp_rank_id, expert_shard_type=0,
                shared_expert_rank_num=shared_expert_rank_num, moe_expert_num=moe_expert_num, scales=scales,
                quant_mode=quant_mode, expert_scales=expert_scales, x_active_mask=x_active_mask)
        if expand_x.dtype == torch.int8:
            y = (expand_x.to(torch.float32) * dynamic_scales.unsqueeze(1)).to(x.dtype)
        else:
            y = expand_x * 2
        out = moedist.npu_moe_distribute_combine_v2(
            expand_x=y, expert_ids=expert_ids, assist_info_for_combine=assist_info, ep_send_counts=ep_recv_counts,
            tp_send_counts=tp_recv_counts, expert_scales=expert_scales, group_ep=group_ep, group_tp=group_tp,
            ep_world_size=ep_world_size, tp_world_size=tp_world_size, ep_rank_id=ep_rank_id, tp_rank_id=tp_rank_id,
            expert_shard_type=0, shared_expert_rank_num=shared_expert_rank_num, moe_expert_num=moe_expert_num,
            x_active_mask=x_active_mask)
        return out, expert_token_nums, ep_recv_counts


def compiled(ctx: Ctx, backend: str = "aot_eager", **over) -> dict:
    """torch.compile(MoeLayer, fullgraph=True) gives the eager result, bit for bit, twice."""
    import torch._dynamo

    c = make_cfg(ctx.world, **over)
    group_ep, group_tp = groups_for(ctx, c)
    g = ctx.rank
    ep_rank, tp_rank = topology(c, g)
    t = gen_inputs(c, g)
    args = (t["x"], t["expert_ids"], group_ep, group_tp, c["W"], c["tp"], ep_rank, tp_rank, c["Sr"], c["E"],
            t.get("scales"), c["quant"], t["expert_scales"], t.get("x_active_mask"))
    model = MoeLayer()
    eager = model(*args)
    torch._dynamo.reset()
    cmodel = torch.compile(model, fullgraph=True, backend=backend)
    start = time.monotonic()
    first = cmodel(*args)
    took = time.monotonic() - start
    second = cmodel(*args)
    for name, e, a, b in zip(("combine output", "expert_token_nums", "ep_recv_counts"), eager, first, second):
        assert torch.equal(e, a) and torch.equal(e, b), f"[rank {g}] compiled {name} differs from eager"
    return {"compile_s": round(took, 1)}


def bad_expert_id(ctx: Ctx, bad_rank: int = 1) -> dict:
    """One rank passes an out-of-range expert id: it raises ValueError naming expert_ids; its peers raise
    RuntimeError naming it. Then the group still works (the failure was part of the exchange)."""
    c = make_cfg(ctx.world)
    group_ep, _ = groups_for(ctx, c)
    t = gen_inputs(c, ctx.rank)
    kw = dispatch_kwargs(c, ctx.rank, t, group_ep, "")
    if ctx.rank == bad_rank:
        ids = kw["expert_ids"].clone()
        ids[1, 0] = c["E"] + 3
        kw["expert_ids"] = ids
    res = {}
    try:
        call(moedist.npu_moe_distribute_dispatch_v2, DISPATCH_POSITIONAL, kw)
        res["raised"] = None
    except Exception as e:  # noqa: BLE001
        res.update(raised=type(e).__name__, message=str(e), value_error=isinstance(e, ValueError),
                   runtime_error=isinstance(e, RuntimeError))
    roundtrip(ctx)  # the communicator is still usable
    res["after"] = "ok"
    return res


def mismatch(ctx: Ctx) -> dict:
    """Rank 0 disagrees on moe_expert_num: every rank raises ValueError naming the parameter."""
    c = make_cfg(ctx.world)
    group_ep, _ = groups_for(ctx, c)
    t = gen_inputs(c, ctx.rank)
    kw = dispatch_kwargs(c, ctx.rank, t, group_ep, "")
    if ctx.rank == 0:
        kw["moe_expert_num"] = c["E"] * 2
    try:
        call(moedist.npu_moe_distribute_dispatch_v2, DISPATCH_POSITIONAL, kw)
        return {"raised": None}
    except Exception as e:  # noqa: BLE001
        return {"raised": type(e).__name__, "message": str(e), "value_error": isinstance(e, ValueError)}


def unsupported(ctx: Ctx) -> dict:
    """elastic_info with comm_alg "hierarchy": NotImplementedError on every rank."""
    c = make_cfg(ctx.world, removed=[ctx.world - 1])
    group_ep, _ = groups_for(ctx, c)
    if ctx.rank not in c["active"]:
        return {"raised": "skipped"}
    t = gen_inputs(c, ctx.rank)
    kw = dispatch_kwargs(c, ctx.rank, t, group_ep, "")
    kw["comm_alg"] = "hierarchy"
    try:
        call(moedist.npu_moe_distribute_dispatch_v2, DISPATCH_POSITIONAL, kw)
        return {"raised": None}
    except Exception as e:  # noqa: BLE001
        return {"raised": type(e).__name__, "message": str(e), "not_implemented": isinstance(e, NotImplementedError)}


def timeout(ctx: Ctx, seconds: float = 1.5) -> dict:
    """The last rank does not call: the others raise RuntimeError (moedist.Timeout) naming it, after the
    group's timeout. Uses a group of its own, which is broken afterwards."""
    c = make_cfg(ctx.world)
    name = ctx.comm("timeout_group", [list(range(ctx.world))], timeout=seconds)
    if ctx.rank == ctx.world - 1:
        return {"raised": "skipped"}
    t = gen_inputs(c, ctx.rank)
    kw = dispatch_kwargs(c, ctx.rank, t, name, "")
    start = time.monotonic()
    try:
        call(moedist.npu_moe_distribute_dispatch_v2, DISPATCH_POSITIONAL, kw)
        return {"raised": None}
    except Exception as e:  # noqa: BLE001
        return {"raised": type(e).__name__, "message": str(e), "runtime_error": isinstance(e, RuntimeError),
                "is_timeout": isinstance(e, moedist.Timeout), "waited": time.monotonic() - start}


def comm_name_idempotent(ctx: Ctx) -> dict:
    """get_comm_name returns the same name for the same group, without communicating; rank checks."""
    a = moedist.get_comm_name(None, ctx.rank)
    b = moedist.get_comm_name()
    err = None
    try:
        moedist.get_comm_name(None, ctx.rank + 1)
    except ValueError as e:
        err = str(e)
    info = moedist._C.group_info(a, ctx.rank)
    return {"same": a == b, "name": a, "rank_error": err, "info": info, "pid": os.getpid()}


def two_hosts(ctx: Ctx, **over) -> dict:
    """Ranks of the upper half report another host name: get_comm_name makes shared memory inside each
    "host" and UCX between them (bootstrapped over the gloo group), and a round over it matches the
    reference bit for bit. (Across real hosts, network namespaces under torchrun: tests/python/multihost.)"""
    import moedist.distributed as md

    c = make_cfg(ctx.world, **over)
    pg = dist.new_group(ranks=list(range(ctx.world)), backend="gloo")
    real = md.socket.gethostname
    if ctx.rank >= ctx.world // 2:
        md.socket.gethostname = lambda: "other-host"
    try:
        name = moedist.get_comm_name(pg, timeout=20, ranks_per_server=c["rps"])
    finally:
        md.socket.gethostname = real
    key = f"world_rps{c['rps']}" if c["rps"] else "world"
    saved = ctx.comms.get(key)
    ctx.comms[key] = name
    try:
        res = roundtrip(ctx, **over)
    finally:
        if saved is None:
            del ctx.comms[key]
        else:
            ctx.comms[key] = saved
    res["info"] = moedist._C.group_info(name, ctx.rank)
    return res


def python_side_rejection(ctx: Ctx, kind: str = "float64", bad_rank: int = 1) -> dict:
    """One rank passes what Python refuses before the op runs (a float64, list, sparse or meta tensor): its
    peers fail at once naming it (not after their deadline), and the group still works."""
    c = make_cfg(ctx.world)
    group_ep, _ = groups_for(ctx, c)
    t = gen_inputs(c, ctx.rank)
    kw = dispatch_kwargs(c, ctx.rank, t, group_ep, "")
    if ctx.rank == bad_rank:
        x = kw["x"]
        kw["x"] = {"float64": lambda: x.double(), "list": lambda: x.tolist(), "sparse": lambda: x.float().to_sparse(),
                   "meta": lambda: torch.empty(x.shape, dtype=x.dtype, device="meta")}[kind]()
    res = {}
    start = time.monotonic()
    try:
        call(moedist.npu_moe_distribute_dispatch_v2, DISPATCH_POSITIONAL, kw)
        res["raised"] = None
    except Exception as e:  # noqa: BLE001
        res.update(raised=type(e).__name__, message=str(e))
    res["seconds"] = time.monotonic() - start
    roundtrip(ctx)  # the rejection was part of the exchange: the communicator is still usable
    res["after"] = "ok"
    return res


def same_dispatch(a, b) -> bool:
    """Two dispatch results (no TP) agree where they are specified: expand_x's received rows,
    assist_info_for_combine's first 3 * rows entries, every other output whole."""
    rows = int(a[4].max()) if a[4].numel() else 0
    return (torch.equal(a[0][:rows], b[0][:rows]) and torch.equal(a[2][:3 * rows], b[2][:3 * rows])
            and all(torch.equal(a[i], b[i]) for i in (1, 3, 4, 5, 6)))


def performance_info(ctx: Ctx, slow_rank: int = 1, sleep_ms: int = 40) -> dict:
    """performance_info through torch: rank slow_rank sleeps before each dispatch; the others' entries for it
    grow by at least 20 ms per round and exceed every other entry; the op only adds (entries start at 7, a
    rank's own entry stays 7); a combine without it leaves the tensor alone; outputs are the same bits as
    without performance_info. Then a float32 tensor on one rank: ValueError naming performance_info there,
    RuntimeError naming that rank on its peers, and the group still works."""
    import torch._dynamo

    c = make_cfg(ctx.world)
    group_ep, _ = groups_for(ctx, c)
    t = gen_inputs(c, ctx.rank)
    kw = dispatch_kwargs(c, ctx.rank, t, group_ep, "")
    d0 = call(moedist.npu_moe_distribute_dispatch_v2, DISPATCH_POSITIONAL, kw)  # also brings the ranks into step
    ckw0 = combine_kwargs(c, ctx.rank, t, d0, expert(c, d0[0], d0[1]), group_ep, "")
    out0 = call(moedist.npu_moe_distribute_combine_v2, COMBINE_POSITIONAL, ckw0)
    W = c["W"]
    perf = torch.full((W,), 7, dtype=torch.int64)
    snaps = []
    for rnd in range(2):
        if ctx.rank == slow_rank:
            time.sleep(sleep_ms / 1000)
        d = call(moedist.npu_moe_distribute_dispatch_v2, DISPATCH_POSITIONAL, dict(kw, performance_info=perf))
        assert same_dispatch(d, d0), "dispatch outputs changed with performance_info"
        snaps.append(perf.tolist())
        ckw = combine_kwargs(c, ctx.rank, t, d, expert(c, d[0], d[1]), group_ep, "")
        if rnd == 0:
            ckw["performance_info"] = perf
        out = call(moedist.npu_moe_distribute_combine_v2, COMBINE_POSITIONAL, ckw)
        assert torch.equal(out, out0), "combine output changed with performance_info"
        snaps.append(perf.tolist())
    res = {"snaps": snaps}
    # Compiled (fullgraph, aot_eager): the mutation of performance_info survives functionalization.
    def step(x, ids, perf_t):
        return call(moedist.npu_moe_distribute_dispatch_v2, DISPATCH_POSITIONAL,
                    dict(kw, x=x, expert_ids=ids, performance_info=perf_t))

    torch._dynamo.reset()
    cstep = torch.compile(step, fullgraph=True, backend="aot_eager")
    cperf = torch.zeros(W, dtype=torch.int64)
    cstep(kw["x"], kw["expert_ids"], cperf)  # compiles (every rank), then brings the ranks into step
    cperf.zero_()
    if ctx.rank == slow_rank:
        time.sleep(sleep_ms / 1000)
    dc = cstep(kw["x"], kw["expert_ids"], cperf)
    assert same_dispatch(dc, d0), "compiled dispatch outputs differ"
    res["compiled"] = cperf.tolist()
    # A bad tensor on rank 0 (float32), in dispatch.
    bad = dict(kw, performance_info=torch.zeros(W, dtype=torch.float32) if ctx.rank == 0 else perf)
    try:
        call(moedist.npu_moe_distribute_dispatch_v2, DISPATCH_POSITIONAL, bad)
        res["raised"] = None
    except Exception as e:  # noqa: BLE001
        res.update(raised=type(e).__name__, message=str(e), value_error=isinstance(e, ValueError))
    res["after_bad"] = perf.tolist()
    roundtrip(ctx)  # the group is still usable
    return res
