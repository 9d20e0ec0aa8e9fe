"""torchair on a CPU: get_npu_backend() gives a torch.compile backend that runs the captured graph here.

On Ascend, torchair turns the FX graph that dynamo captures into a GE graph for the NPU. Here the
backend is torch's own: "aot_eager" by default (AOT-autograd traces the graph, with the MoE operators
as single nodes through their fake implementations, and runs it with CPU kernels), or any torch.compile
backend named by MOEDIST_NPU_TORCHAIR_BACKEND (e.g. "inductor", which compiles C++ kernels and takes
much longer to start). CompilerConfig holds torchair's options; those that tune the NPU graph compiler
(GE options, dumps, frozen parameters, graph gears...) have no CPU counterpart and do not change the
computation; mode "reduce-overhead" (NPU graph capture) runs the same compiled graph.
"""
from __future__ import annotations

import os

import torch

from . import module_getattr, not_provided

_MODES = ("max-autotune", "reduce-overhead")


class _Section:
    """One group of torchair options: attributes a program sets and reads back."""

    def __init__(self, path: str, **defaults):
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_values", dict(defaults))

    def __getattr__(self, name):
        values = object.__getattribute__(self, "_values")
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in values:  # a nested section created on first use (e.g. debug.graph_dump)
            values[name] = _Section(f"{object.__getattribute__(self, '_path')}.{name}")
        return values[name]

    def __setattr__(self, name, value):
        object.__getattribute__(self, "_values")[name] = value

    def __repr__(self):
        return f"{object.__getattribute__(self, '_path')}({object.__getattribute__(self, '_values')})"


class CompilerConfig:
    """torchair.CompilerConfig: mode ("max-autotune" or "reduce-overhead") and option sections
    (debug, export, dump_config, fusion_config, experimental_config, inference_config, ge_config,
    aoe_config, aclgraph_config) whose values are kept and read back."""

    def __init__(self):
        self.mode = "max-autotune"
        for section in ("debug", "export", "dump_config", "fusion_config", "experimental_config",
                        "inference_config", "ge_config", "aoe_config", "aclgraph_config"):
            setattr(self, section, _Section(f"CompilerConfig.{section}"))

    def __setattr__(self, name, value):
        if name == "mode" and value not in _MODES:
            raise ValueError(f"torchair.CompilerConfig: mode={value!r} (must be one of {', '.join(_MODES)})")
        object.__setattr__(self, name, value)


def _compile_backend_name() -> str:
    return os.environ.get("MOEDIST_NPU_TORCHAIR_BACKEND", "aot_eager")


def get_npu_backend(*, compiler_config: CompilerConfig | None = None, custom_decompositions: dict | None = None):
    """A torch.compile backend: torch.compile(model, backend=torchair.get_npu_backend(), ...)."""
    if compiler_config is not None and not isinstance(compiler_config, CompilerConfig):
        raise TypeError(f"torchair.get_npu_backend: compiler_config must be a torchair.CompilerConfig, "
                        f"got {type(compiler_config).__name__}")
    if custom_decompositions:
        raise not_provided("torchair.get_npu_backend(custom_decompositions=...)")
    name = _compile_backend_name()
    inner = torch._dynamo.lookup_backend(name)

    def npu_backend(gm: torch.fx.GraphModule, example_inputs):
        return inner(gm, example_inputs)

    npu_backend.compiler_config = compiler_config or CompilerConfig()
    npu_backend.inner_backend = name
    return npu_backend


def patch_for_hcom() -> None:
    """On Ascend: lets dynamo capture torch.distributed collectives into NPU graphs. With gloo underneath,
    torch.compile handles them itself: nothing to patch."""


__getattr__ = module_getattr("torchair")
