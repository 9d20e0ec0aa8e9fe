"""torch tensors to the C++ core and back, without libtorch.

In: a tensor becomes (data_ptr, dtype code, shape, strides) — strided views (transposed, sliced) pass
as they are, the C++ side reads them through their strides. The caller keeps the tensor alive for the
call. Out: the core returns DLPack capsules that own the C++ tensors; torch.from_dlpack wraps them
without a copy and releases them when the torch tensor dies.
"""
from __future__ import annotations

import torch

# moedist::DType codes (include/moedist/tensor.h).
DTYPE_CODES = {
    torch.bfloat16: 0,
    torch.float16: 1,
    torch.float32: 2,
    torch.int8: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.bool: 6,
}


def view(t, name: str, op: str):
    """The (data_ptr, dtype, shape, strides) tuple of a CPU tensor, or None."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise NotImplementedError(
            f"{op}: {name} is on device {t.device} (moedist runs on the CPU: pass CPU tensors; "
            f"the accelerator backends are not implemented)")
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        allowed = ", ".join(str(d).replace("torch.", "") for d in DTYPE_CODES)
        raise ValueError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')} (moedist takes {allowed})")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} has layout {t.layout} (must be a dense, strided tensor)")
    return (t.data_ptr(), code, tuple(int(s) for s in t.shape), tuple(int(s) for s in t.stride()))


def from_capsule(capsule) -> torch.Tensor:
    return torch.from_dlpack(capsule)
