"""moedist's CPU stand-in for torchair (see moedist.npu._torchair and docs/ascend.md)."""
import moedist.npu as _npu

_npu.install()

from moedist.npu._torchair import CompilerConfig, get_npu_backend, patch_for_hcom  # noqa: E402,F401

__moedist_stand_in__ = True
__getattr__ = _npu.module_getattr("torchair")
