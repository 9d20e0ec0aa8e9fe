"""The torch surface on CPU processes (spawn + gloo, moedist's shared-memory communicator), against the
reference bit for bit, on world sizes 2, 3 and 4 and the operators' features."""
import pytest

# (world size, configuration overrides of _scenarios.DEFAULTS)
CASES = {
    "plain-w2": (2, {}),
    "plain-w3": (3, {}),
    "plain-w4-repeat": (4, dict(repeat=3)),
    "bs0-w2": (2, dict(BS=0)),
    "fp16-w2": (2, dict(dtype="fp16", K=3)),
    "fp16-w4-etn0": (4, dict(dtype="fp16", etn_type=0, L=3)),
    "quant-w3": (3, dict(quant=2)),
    "quant-smooth-w4": (4, dict(quant=2, smooth=True)),
    "shared-w3": (3, dict(Sr=1)),
    "shared2-w4-quant": (4, dict(Sr=2, shared_num=2, quant=2, smooth=True)),
    "shared_expert_x-w2": (2, dict(shared_x=True)),
    "mask1d-w3": (3, dict(mask="1d", BS=8)),
    "mask2d-w4-shared": (4, dict(mask="2d", Sr=1)),
    "special-w3": (3, dict(Z=1, C=1, Q=2, K=3)),
    "special-fp16-w2": (2, dict(dtype="fp16", Z=2, C=1, Q=1, K=4)),
    "tp2-w4": (4, dict(tp=2, L=1)),
    "tp2-w4-quant": (4, dict(tp=2, L=1, quant=2, smooth=True)),
    "tp2-w4-shared": (4, dict(tp=2, Sr=1, shared_num=1, E=1, K=1)),
    "elastic-w4": (4, dict(removed=[2])),
    "elastic-w4-shared-special": (4, dict(removed=[3], Sr=1, Z=1, C=1, Q=1, K=3)),
    "elastic-noop-w3": (3, dict(elastic_noop=True)),
    "noncontig-w3": (3, dict(noncontig=True, quant=2, smooth=True, mask="2d")),
    "noncontig-w4-special-fp16": (4, dict(noncontig=True, dtype="fp16", Z=1, C=1, Q=2, K=3, Sr=1, mask="1d")),
    "noncontig-w2-shared_x": (2, dict(noncontig=True, shared_x=True)),
    "ragged-global_bs-w3": (3, dict(ragged=True)),
    "comm_quant-w3": (3, dict(comm_quant=2)),
    "hierarchy-w4": (4, dict(comm_alg="hierarchy", rps=2)),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_matches_reference(pools, case):
    world, over = CASES[case]
    results = pools.get(world).run("roundtrip", **over)
    called = [r for r in results if r["called"]]
    if over.get("removed"):
        assert len(called) == world - len(over["removed"])
    else:
        assert len(called) == world


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_bad_expert_id_maps_to_value_error_and_peers_to_runtime_error(pools, world):
    bad = 1
    res = pools.get(world).run("bad_expert_id", bad_rank=bad)
    for r, x in enumerate(res):
        assert x["after"] == "ok"
        if r == bad:
            assert x["value_error"], x
            assert "expert_ids[1][0]" in x["message"] and "out of range" in x["message"], x["message"]
            assert x["raised"] == "InvalidArgument"
        else:
            assert x["runtime_error"] and not x["value_error"], x
            assert f"rank {bad} rejected its call" in x["message"], x["message"]
            assert "expert_ids" in x["message"]
            assert x["raised"] == "TransportError"


@pytest.mark.timeout(120)
def test_parameter_mismatch_is_value_error_on_every_rank(pools):
    res = pools.get(3).run("mismatch")
    for x in res:
        assert x["value_error"], x
        assert "moe_expert_num" in x["message"], x["message"]


@pytest.mark.timeout(120)
def test_unsupported_maps_to_not_implemented_error(pools):
    res = pools.get(3).run("unsupported")
    for r, x in enumerate(res):
        if r == 2:
            assert x["raised"] == "skipped"
            continue
        assert x["not_implemented"], x
        assert "hierarchy" in x["message"]


@pytest.mark.timeout(120)
def test_missing_peer_times_out_with_runtime_error_naming_it(pools):
    world = 3
    res = pools.get(world).run("timeout", seconds=1.5)
    for r, x in enumerate(res[:-1]):
        assert x["runtime_error"] and x["is_timeout"], x
        assert f"rank {world - 1}" in x["message"] and "timed out" in x["message"], x["message"]
        assert 1.0 < x["waited"] < 30
    assert res[-1]["raised"] == "skipped"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("over", [dict(), dict(comm_alg="hierarchy", rps=2, quant=2)], ids=["fullmesh", "hierarchy"])
def test_group_spanning_hosts_gets_shm_inside_and_ucx_between(pools, over):
    res = pools.get(4).run("two_hosts", **over)
    for r, x in enumerate(res):
        assert x["called"] and x["info"]["transport"] == "ucx", x
        assert x["info"]["rank"] == r and x["info"]["world_size"] == 4 and x["info"]["ranks_per_server"] == 2, x


@pytest.mark.timeout(120)
def test_get_comm_name_is_idempotent_and_checks_rank(pools):
    res = pools.get(2).run("comm_name_idempotent")
    assert res[0]["name"] == res[1]["name"]
    for r, x in enumerate(res):
        assert x["same"]
        assert x["rank_error"] and "global rank" in x["rank_error"]
        assert x["info"]["transport"] == "shm" and x["info"]["rank"] == r and x["info"]["world_size"] == 2


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world,over", [(2, dict(quant=2, smooth=True)), (4, dict(tp=2, L=1, mask="2d"))],
                         ids=["w2-quant", "w4-tp2-mask"])
def test_torch_compile_fullgraph_matches_eager(pools, world, over):
    res = pools.get(world).run("compiled", timeout=150, backend="aot_eager", **over)
    assert len(res) == world


@pytest.mark.timeout(400)
def test_performance_info_names_the_slow_rank(pools):
    world, slow = 2, 1

    def timing_ok(res):
        """The others waited >= 20 ms per round for the slow rank, more than for anyone else (a loaded
        machine can delay any rank: the run is tried again, at most 3 times, when only this fails)."""
        for r, x in enumerate(res):
            if r == slow:
                continue
            s = x["snaps"]
            for i, rnd in ((0, 0), (2, 1)):
                if s[i][slow] < 7 + 20000 * (rnd + 1) or any(v >= s[i][slow] for j, v in enumerate(s[i]) if j != slow):
                    return False
            if x["compiled"][slow] < 20000:
                return False
        return True

    for _ in range(3):
        res = pools.get(world).run("performance_info", slow_rank=slow, sleep_ms=40)
        if timing_ok(res):
            break
    assert timing_ok(res), res
    for r, x in enumerate(res):
        snaps = x["snaps"]  # after dispatch 0, combine 0 (with), dispatch 1, combine 1 (without)
        for s in snaps:
            assert s[r] == 7, (r, snaps)  # a rank never waits for itself; the op adds to what was there
        for a, b in zip(snaps, snaps[1:]):
            assert all(vb >= va for va, vb in zip(a, b)), (r, snaps)  # accumulates
        assert snaps[3] == snaps[2], (r, snaps)  # the combine without performance_info left it alone
        assert x["compiled"][r] == 0, x["compiled"]
        # the rejected call: rank 0 names the parameter; the peer names rank 0
        if r == 0:
            assert x["raised"] == "InvalidArgument" and x["value_error"], x
            assert "performance_info has dtype float32 (must be int64)" in x["message"], x["message"]
            assert x["after_bad"] == snaps[3], x  # its valid tensor was not passed to the rejected call
        else:
            assert x["raised"] in ("TransportError", "RuntimeError"), x
            assert "rank 0" in x["message"] and "performance_info" in x["message"], x["message"]
            # it took part in the failed exchange: it may have added some waits, never removed any
            assert all(vb >= va for va, vb in zip(snaps[3], x["after_bad"])) and x["after_bad"][r] == 7, x
