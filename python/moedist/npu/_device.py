"""torch.npu / torch_npu.npu on a CPU: the device "npu" is host memory.

torch cannot make torch.device("npu") a CPU device: a device's type is fixed when it is built. The
stand-in therefore (1) names torch's PrivateUse1 device "npu" (torch.utils.rename_privateuse1_backend),
so torch.device("npu"), "npu:3" and torch.device("npu", 3) are valid objects, as on Ascend, and
(2) maps that device to the CPU wherever a program moves or creates a tensor: Tensor.npu(),
Tensor.to(...), Module.npu() / Module.to(...), Tensor.new_*(device=...) and torch's factory functions
(torch.empty/zeros/ones/full/rand/randn/randint/arange/tensor/..., device=...). Tensors are CPU
tensors: x.device is cpu, x.is_npu is True (npu memory is host memory here). A kernel called on a
real PrivateUse1 tensor cannot happen through these paths; a path not listed raises torch's own
"not implemented for the 'npu' backend" error instead of computing anything.

This module is torch.npu and torch_npu.npu after install(); names it lacks raise NotImplementedError.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time

import torch

from . import module_getattr

__moedist_stand_in__ = True
__getattr__ = module_getattr("torch.npu")

_state = threading.local()
_DEFAULT_COUNT = 16  # one Atlas A3 server's dies; MOEDIST_NPU_DEVICE_COUNT changes it


def device_count() -> int:
    """How many "npu" devices the stand-in reports (MOEDIST_NPU_DEVICE_COUNT, default 16): all of them
    are this host's CPU."""
    try:
        return max(1, int(os.environ.get("MOEDIST_NPU_DEVICE_COUNT", _DEFAULT_COUNT)))
    except ValueError:
        return _DEFAULT_COUNT


def is_available() -> bool:
    return True


def is_initialized() -> bool:
    return True


def init() -> None:
    pass


def _index(device, api: str) -> int:
    if device is None:
        return current_device()
    if isinstance(device, int):
        idx = device
    else:
        if isinstance(device, str):
            try:
                device = torch.device(device)
            except RuntimeError as e:
                raise ValueError(f"{api}: device={device!r} is not a device name ({e})") from None
        if not isinstance(device, torch.device):
            raise TypeError(f"{api}: device must be an int, a str or a torch.device, got {type(device).__name__}")
        if device.type != "npu":
            raise ValueError(f"{api}: device={device} (must be an npu device)")
        idx = current_device() if device.index is None else device.index
    n = device_count()
    if not 0 <= idx < n:
        raise ValueError(f"{api}: device index {idx} out of range (must be in [0, {n}); the stand-in reports "
                         f"{n} npu devices, MOEDIST_NPU_DEVICE_COUNT sets another number)")
    return idx


def set_device(device) -> None:
    """Records the current npu index (all indices are this host's CPU)."""
    _state.index = _index(device, "torch.npu.set_device")


def current_device() -> int:
    return getattr(_state, "index", 0)


def get_device_name(device=None) -> str:
    _index(device, "torch.npu.get_device_name")
    return "CPU (moedist npu stand-in)"


def synchronize(device=None) -> None:
    """CPU work is finished when a call returns: nothing to wait for."""
    _index(device, "torch.npu.synchronize")


class device:  # noqa: N801  (torch.npu.device, a context manager)
    def __init__(self, dev):
        self.idx = _index(dev, "torch.npu.device")

    def __enter__(self):
        self.prev = current_device()
        _state.index = self.idx
        return self

    def __exit__(self, *exc):
        _state.index = self.prev
        return False


def manual_seed(seed: int) -> None:
    """npu random numbers are CPU random numbers: seeds torch's CPU generator."""
    torch.manual_seed(seed)


manual_seed_all = manual_seed


def empty_cache() -> None:
    """Host memory is returned to the allocator when tensors die: nothing is cached."""


def set_compile_mode(jit_compile: bool = False) -> None:
    """Chooses between online-compiled and prebuilt NPU kernels; CPU kernels are prebuilt."""


class _Config:
    """torch_npu.npu.config: allow_internal_format (private NPU formats do not exist on CPU)."""

    def __init__(self):
        self.allow_internal_format = False


config = _Config()


class Stream:
    """A stream on a CPU where every operation completes before the call returns: synchronize / wait
    have nothing to wait for, query() is True."""

    def __init__(self, device=None, priority: int = 0, **kwargs):
        self.device_index = _index(device, "torch.npu.Stream")
        self.priority = priority

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        event = event or Event()
        event.record(self)
        return event


_default_stream = None


def current_stream(device=None) -> Stream:
    global _default_stream
    if _default_stream is None:
        _default_stream = Stream()
    return getattr(_state, "stream", None) or _default_stream


default_stream = current_stream


@contextlib.contextmanager
def stream(s):
    prev = getattr(_state, "stream", None)
    _state.stream = s
    try:
        yield s
    finally:
        _state.stream = prev


class Event:
    """Records the host time when recorded (work before it has finished on a CPU); elapsed_time in ms."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.enable_timing = enable_timing
        self._t = None

    def record(self, stream=None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, stream=None) -> None:
        pass

    def elapsed_time(self, end: "Event") -> float:
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("torch.npu.Event.elapsed_time: both events need enable_timing=True")
        if self._t is None or end._t is None:
            raise RuntimeError("torch.npu.Event.elapsed_time: both events must be recorded first")
        return (end._t - self._t) * 1000.0


# ---- the device "npu" is CPU memory ----

def _is_npu(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "npu"
    if isinstance(d, str):
        return d == "npu" or d.startswith("npu:")
    return False


def _cpu(d):
    if _is_npu(d):
        _index(d, "device")  # an index past device_count() is an error, as on Ascend
        return torch.device("cpu")
    return d


def _map_device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        d = kwargs.get("device")
        if d is not None and _is_npu(d):
            kwargs["device"] = _cpu(d)
        return fn(*args, **kwargs)

    wrapper.__moedist_wrapped__ = fn
    return wrapper


_FACTORIES = ("empty", "zeros", "ones", "full", "rand", "randn", "randint", "randperm", "arange", "range",
              "linspace", "logspace", "eye", "tensor", "as_tensor", "asarray", "empty_like", "zeros_like",
              "ones_like", "full_like", "rand_like", "randn_like", "randint_like", "empty_strided",
              "scalar_tensor", "tril_indices", "triu_indices", "frombuffer")
_TENSOR_NEW = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "new_empty_strided")
_patched = False


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return False

    def has_primary_context(self, device_index: int) -> bool:
        return False

    def is_built(self) -> bool:
        return True


class _Guard(torch._C._acc.DeviceGuard):
    def type_(self):
        return torch._C._autograd.DeviceType.PrivateUse1


def install() -> None:
    global _patched
    if _patched:
        return
    import sys

    if torch._C._get_privateuse1_backend_name() != "npu":
        torch.utils.rename_privateuse1_backend("npu")
    if getattr(torch, "npu", None) is None:
        torch._register_device_module("npu", sys.modules[__name__])
    # torch asks the PrivateUse1 hooks whether the device exists (e.g. dist.barrier through
    # torch._C._get_accelerator()). They answer "not available", so torch's own code keeps choosing the
    # CPU, where npu tensors live; torch.npu.is_available() (this module) answers True to programs.
    torch._C._acc.register_python_privateuseone_hook(_Hooks())
    torch._C._acc.register_python_privateuseone_device_guard(_Guard())

    for name in _FACTORIES:
        fn = getattr(torch, name, None)
        if fn is not None and not hasattr(fn, "__moedist_wrapped__"):
            setattr(torch, name, _map_device_kwarg(fn))
    for name in _TENSOR_NEW:
        fn = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, _map_device_kwarg(fn))

    tensor_to = torch.Tensor.to

    @functools.wraps(tensor_to)
    def to(self, *args, **kwargs):
        if args and _is_npu(args[0]):
            args = (_cpu(args[0]),) + args[1:]
        d = kwargs.get("device")
        if d is not None and _is_npu(d):
            kwargs["device"] = _cpu(d)
        return tensor_to(self, *args, **kwargs)

    def npu(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        """Tensor.npu(): the tensor is already in "npu" (host) memory: returned as it is."""
        if device is not None:
            _index(device, "Tensor.npu")
        if memory_format is not torch.preserve_format:
            return self.contiguous(memory_format=memory_format)
        return self

    torch.Tensor.to = to
    torch.Tensor.npu = npu
    torch.Tensor.is_npu = property(lambda self: self.device.type == "cpu")

    def module_npu(self, device=None):
        """Module.npu(): parameters and buffers stay in host memory, which is "npu" memory here."""
        if device is not None:
            _index(device, "Module.npu")
        return self

    torch.nn.Module.npu = module_npu
    _patched = True
