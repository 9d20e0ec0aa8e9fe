"""moedist's CPU stand-in for torch_npu (see moedist.npu and docs/ascend.md). Found only where
moedist.npu.install() (or `python -m moedist.npu`) put this folder on the path."""
import sys as _sys

import moedist as _moedist
import moedist.npu as _npu

_npu.install()

import torch as _torch  # noqa: E402

from moedist.npu import _device as npu  # noqa: E402
from moedist.npu._ops import operators as _operators  # noqa: E402

__moedist_stand_in__ = True
__version__ = f"{_moedist.__version__}+moedist.cpu"
_sys.modules.setdefault(__name__ + ".npu", npu)

for _name in _operators():
    globals()[_name] = getattr(_torch.ops.npu, _name)

__getattr__ = _npu.module_getattr("torch_npu")
