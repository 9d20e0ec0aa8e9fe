"""torchair.configs.compiler_config (moedist stand-in)."""
from moedist.npu._torchair import CompilerConfig  # noqa: F401
