"""CPU simulator for `mx.fast.metal_kernel` kernels: rebuilds MLX 0.32's exact kernel source, compiles it
as strict C++ (msl_compat.h) and runs threadgroups with real barriers and SIMD-group collectives.

Use `fake_metal_kernel` in place of `mx.fast.metal_kernel` (monkeypatch), `sim_options` to change the
thread order. See docs/kernels.md.
"""

from .build import SimCompileError
from .runner import SimError, SimFault, compile_many, fake_metal_kernel, sim_options, stats
from .source import generate, verbose_text

__all__ = ["SimCompileError", "SimError", "SimFault", "compile_many", "fake_metal_kernel", "generate",
           "sim_options", "stats", "verbose_text"]
