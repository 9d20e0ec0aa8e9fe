"""Ascend programs run unchanged under `python -m moedist.npu`, and the stand-in's boundaries.

The scripts in examples/ascend import torch_npu / torchair and are written for NPUs; they run here as
subprocesses with no line changed and must end with their success line. The other tests check what the
stand-in covers, what it refuses and that nothing is patched without the opt-in.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASCEND = os.path.join(ROOT, "examples", "ascend")


def run(args, timeout, env=None, cwd=None):
    e = dict(os.environ)
    e.pop("MOEDIST_NPU", None)
    e.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=cwd or ROOT)


def run_ascend_script(name, timeout):
    p = run(["-m", "moedist.npu", os.path.join(ASCEND, name)], timeout)
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{p.stdout}\n{p.stderr[-4000:]}"
    return p.stdout.strip().splitlines()


@pytest.mark.timeout(180)
def test_single_operator_16_ranks_shared_experts_quant():
    lines = run_ascend_script("single_operator_16ranks.py", 170)
    assert lines[-1] == "run npu_moe_distribute_dispatch_v2 / combine_v2 on 16 ranks success."
    assert sum(line.endswith("-> ok") for line in lines) == 16
    assert sum("(shared)" in line for line in lines) == 2


@pytest.mark.timeout(180)
def test_graph_mode_through_torchair():
    lines = run_ascend_script("graph_mode_torchair.py", 170)
    assert lines[-1] == "run torchair graph mode MoE layer success."
    assert sum(line.endswith("graph == eager: True") for line in lines) == 4


@pytest.mark.timeout(180)
def test_mc2_token_dispatcher():
    lines = run_ascend_script("mc2_token_dispatcher.py", 170)
    assert lines[-1] == "run MC2 token dispatcher MoE layer success."
    assert sum("padding rows zero: True" in line for line in lines) == 8


def run_snippet(tmp_path, code, *, stand_in=True, timeout=90, env=None):
    script = tmp_path / "snippet.py"
    script.write_text(textwrap.dedent(code))
    args = ["-m", "moedist.npu", str(script)] if stand_in else [str(script)]
    return run(args, timeout, env=env)


@pytest.mark.timeout(120)
def test_importing_moedist_patches_nothing(tmp_path):
    p = run_snippet(tmp_path, """
        import torch, torch.distributed as dist
        import moedist, moedist.npu
        assert not hasattr(torch, "npu"), torch.npu
        assert "hccl" not in dist.Backend.backend_list
        assert not hasattr(torch.Tensor, "npu")
        try:
            import torch_npu
        except ImportError:
            pass
        else:
            raise AssertionError("torch_npu importable without the opt-in")
        try:
            torch.device("npu")
        except RuntimeError:
            print("untouched")
        """, stand_in=False)
    assert p.returncode == 0 and p.stdout.strip() == "untouched", p.stdout + p.stderr


@pytest.mark.timeout(120)
def test_devices_and_uncovered_apis(tmp_path):
    p = run_snippet(tmp_path, """
        import torch
        import torch_npu
        import torchair
        torch_npu.npu.set_device("npu:3")
        assert torch.npu.current_device() == 3 and torch.npu.is_available() and torch.npu.device_count() == 16
        x = torch.ones(2, 3).npu()
        assert x.device.type == "cpu" and x.is_npu
        assert torch.zeros(2, device="npu").device.type == "cpu"
        assert torch.empty(2, device=torch.device("npu", 1)).device.type == "cpu"
        assert x.to("npu:0").device.type == "cpu" and x.to(torch.device("npu"), torch.float16).dtype == torch.float16
        assert x.new_zeros(4, device="npu").device.type == "cpu"
        m = torch.nn.Linear(3, 3).npu().to("npu")
        assert m.weight.device.type == "cpu"
        torch.npu.synchronize()
        try:
            torch.npu.set_device(99)
        except ValueError as e:
            assert "99" in str(e), e
        else:
            raise AssertionError("set_device(99) accepted")
        assert not hasattr(torch_npu, "npu_grouped_matmul")
        try:
            torch_npu.npu_grouped_matmul
        except NotImplementedError as e:
            assert "torch_npu.npu_grouped_matmul" in str(e), e
        try:
            from torch_npu.contrib import transfer_to_npu
        except NotImplementedError as e:
            assert "torch_npu.contrib" in str(e), e
        try:
            torch.npu.memory_allocated()
        except NotImplementedError as e:
            assert "torch.npu.memory_allocated" in str(e), e
        try:
            torchair.inference
        except NotImplementedError as e:
            assert "torchair.inference" in str(e), e
        schema = str(torch.ops.npu.npu_moe_distribute_dispatch_v2.default._schema)
        assert "int moe_expert_num, *, Tensor? scales=None" in schema, schema
        assert torch_npu.npu_moe_distribute_combine_v2 is torch.ops.npu.npu_moe_distribute_combine_v2
        print("covered")
        """)
    assert p.returncode == 0 and p.stdout.strip() == "covered", p.stdout + p.stderr


@pytest.mark.timeout(120)
def test_children_get_the_stand_in(tmp_path):
    p = run_snippet(tmp_path, """
        import subprocess, sys
        import torch
        import torch.multiprocessing as mp
        import torch_npu

        def child(q):
            import torch_npu
            q.put((torch_npu.__moedist_stand_in__, str(torch.ones(1).npu().device)))

        if __name__ == "__main__":
            for method in ("spawn", "fork"):
                ctx = mp.get_context(method)
                q = ctx.SimpleQueue()
                p = ctx.Process(target=child, args=(q,))
                p.start(); p.join()
                assert p.exitcode == 0 and q.get() == (True, "cpu"), method
            out = subprocess.run([sys.executable, "-c", "import torch_npu; print(torch_npu.__moedist_stand_in__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
            assert out == "True", out
            print("children ok")
        """)
    assert p.returncode == 0 and p.stdout.strip() == "children ok", p.stdout + p.stderr


@pytest.mark.timeout(120)
def test_refuses_a_real_torch_npu(tmp_path):
    real = tmp_path / "site" / "torch_npu"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("raise SystemExit('the real torch_npu was imported')\n")
    p = run_snippet(tmp_path, "import torch_npu\nprint('ran')\n", env={"PYTHONPATH": str(tmp_path / "site")})
    assert p.returncode != 0 and "ran" not in p.stdout
    assert "a real torch_npu is present" in p.stderr and str(real) in p.stderr, p.stderr
