"""The examples run (each spawns its own ranks) and end with their success line."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_example(name, *args, timeout=240):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{name} {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert lines[-1] == "run moedist success.", p.stdout
    return p.stdout


@pytest.mark.timeout(300)
def test_single_operator_example_elastic_special_quant():
    out = run_example("single_operator.py")
    assert "removed by elastic_info" in out
    assert out.count("matches reference: dispatch True, combine True") == 3


@pytest.mark.timeout(300)
def test_single_operator_example_tp2():
    out = run_example("single_operator.py", "--tp-world-size", "2", "--local-moe-expert-num", "1", "--k", "2")
    assert out.count("matches reference: dispatch True, combine True") == 4


@pytest.mark.timeout(300)
def test_graph_mode_example():
    out = run_example("graph_mode.py", "--backend", "aot_eager")
    assert out.count("equal to eager: True") == 3
