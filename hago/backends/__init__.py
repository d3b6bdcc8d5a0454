"""hago's backends: one folder per device family behind one small interface.

- ``x86/``: VNNI conv/dense and depthwise kernels, the blocked NCHW16c layout
  between them, their default schedules (``schedule_vnni``);
- ``arm/``: int8 matmul/conv2d tensorized with NEON ``smull`` or ``sdot``,
  swapped in after realize;
- ``cuda/``: ``__dp4a`` GEMM kernels swapped in after realize, dlight for the
  rest, the build and export that keep the CUDA source;
- ``cpu/``: a generic LLVM CPU (plain integer ops, ``hago.lower``'s fusion and
  default schedules); x86 and arm build on it.

:class:`Backend` says what differs between devices (plan, rewrite, schedule
and build, how builds run); :mod:`.registry` names them and picks one per
spec (its ``backend:`` key, or derived from the target kind and intrinsics).
The rest of hago imports only this package, never a backend's own modules.
Importing it imports no TVM.
"""

from .base import (INT32, NATIVE, REQUANTIZED, Backend, ConvArgs, ConvKernel, Emitted, NativeLayout, Plan,
                   Requant)
from .registry import (BACKENDS, backend_names, backend_of, cpu_kinds, for_target, get_backend, register_backend,
                       resolve, target_kinds)

__all__ = [
    "BACKENDS",
    "Backend",
    "ConvArgs",
    "ConvKernel",
    "Emitted",
    "INT32",
    "NATIVE",
    "NativeLayout",
    "Plan",
    "REQUANTIZED",
    "Requant",
    "backend_names",
    "backend_of",
    "cpu_kinds",
    "for_target",
    "get_backend",
    "register_backend",
    "resolve",
    "target_kinds",
]
