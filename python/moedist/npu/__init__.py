"""moedist.npu: a stand-in for torch_npu and torchair on CPUs, so that Ascend code runs unchanged.

    python -m moedist.npu your_script.py [args...]       # the script, and the processes it starts
    python -m moedist.npu -m pytest tests/                 # a module, as `python -m`

or, from a test suite's conftest.py::

    import moedist.npu
    moedist.npu.install()

After install(), ``import torch_npu`` and ``import torchair`` give moedist's stand-ins (packages in
moedist/npu/_shim, put first on sys.path and on PYTHONPATH so that child processes find them too), the
device name "npu" means CPU memory, the "hccl" process-group backend is gloo, and
torch_npu.npu_moe_distribute_* are moedist's operators. What is covered and how is listed in
docs/ascend.md; every other torch_npu / torchair name raises NotImplementedError naming it.

Importing moedist or moedist.npu changes nothing; only install() does. install() refuses to run where a
real torch_npu is importable or loaded.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shim")
ENV_FLAG = "MOEDIST_NPU"  # set to "1" in the environment of an installed process (children inherit it)

_lock = threading.RLock()
_installed = False


class NotProvided(NotImplementedError, AttributeError):
    """A torch_npu / torchair API the stand-in does not provide.

    A NotImplementedError (what callers see), also an AttributeError so that hasattr() / getattr(m, name,
    default) probes answer "absent" as they would for a torch_npu build without the API.
    """


def not_provided(api: str) -> NotProvided:
    return NotProvided(f"{api} is not provided by moedist's torch_npu stand-in on CPU "
                       f"(see docs/ascend.md for what is covered)")


def module_getattr(prefix: str):
    """A module-level __getattr__ that raises NotProvided for every missing public name."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(f"module {prefix!r} has no attribute {name!r}")
        raise not_provided(f"{prefix}.{name}")

    return __getattr__


def _is_ours(mod) -> bool:
    f = getattr(mod, "__file__", None)
    return bool(f) and os.path.abspath(f).startswith(SHIM_DIR + os.sep)


def _real_torch_npu() -> str | None:
    """Where a real torch_npu lives (loaded or importable), or None."""
    mod = sys.modules.get("torch_npu")
    if mod is not None and not _is_ours(mod):
        return getattr(mod, "__file__", None) or repr(mod)
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != SHIM_DIR]
    spec = importlib.machinery.PathFinder.find_spec("torch_npu", path)
    if spec is not None:
        return spec.origin or str(list(spec.submodule_search_locations or []))
    return None


class _MissingSubmodules(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path: a torch_npu.* / torchair.* submodule the stand-in lacks raises NotProvided
    instead of a bare ModuleNotFoundError."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(("torch_npu.", "torchair.")):
            raise not_provided(f"module {fullname}")
        return None


def is_installed() -> bool:
    return _installed


def install() -> None:
    """Makes this process (and the Python processes it starts) see moedist's torch_npu / torchair.

    Idempotent. Raises RuntimeError, changing nothing, when a real torch_npu is installed or loaded, or
    when torch's PrivateUse1 device already belongs to another backend.
    """
    global _installed
    with _lock:
        if _installed:
            return
        real = _real_torch_npu()
        if real is not None:
            raise RuntimeError(
                f"moedist.npu.install: a real torch_npu is present ({real}); the CPU stand-in is never "
                f"installed over it. Run without `python -m moedist.npu` / install() to use the NPU, or in an "
                f"environment without torch_npu to use moedist on CPUs.")
        import torch

        current = torch._C._get_privateuse1_backend_name()
        if current not in ("privateuseone", "npu"):
            raise RuntimeError(f"moedist.npu.install: torch's PrivateUse1 device is already named {current!r} "
                               f"by another backend; the stand-in needs it for \"npu\"")
        if getattr(torch, "npu", None) is not None and not getattr(torch.npu, "__moedist_stand_in__", False):
            raise RuntimeError(f"moedist.npu.install: torch.npu already exists ({torch.npu!r}): another NPU "
                               f"backend is loaded")

        from . import _device, _dist, _ops

        _device.install()
        _dist.install()
        _ops.install()

        if SHIM_DIR not in sys.path:
            sys.path.insert(1 if sys.path and sys.path[0] not in ("",) else 0, SHIM_DIR)
        parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != SHIM_DIR]
        os.environ["PYTHONPATH"] = os.pathsep.join([SHIM_DIR] + parts)
        os.environ[ENV_FLAG] = "1"
        if not any(isinstance(f, _MissingSubmodules) for f in sys.meta_path):
            sys.meta_path.append(_MissingSubmodules())
        _installed = True


__all__ = ["install", "is_installed", "NotProvided", "SHIM_DIR"]
