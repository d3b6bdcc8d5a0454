"""What a realized module really computes: the dtypes of its heavy kernels.

The tests' proof that every conv and dense runs on 8-bit inputs with int32
accumulation comes from reading the IR, not from trusting the strategy. Only
tests use it, so it lives beside them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import tvm
from tvm import relax

HEAVY_OPS = ("relax.nn.conv2d", "relax.matmul")
#: hand-scheduled kernels (hago.backends.x86) that stand in for conv2d / matmul
HEAVY_KERNELS = ("hago_conv2d_nchwc_vnni", "hago_dense_vnni", "hago_dense_int4_vnni", "hago_conv2d_depthwise")


@dataclass(frozen=True)
class KernelInfo:
    op: str
    input_dtypes: tuple[str, ...]
    output_dtype: str

    @property
    def integer(self) -> bool:
        """8-bit inputs, and an int32 accumulator out (or 8 bits, from a kernel that requantizes itself)."""
        return (all(d in ("int8", "uint8") for d in self.input_dtypes)
                and self.output_dtype in ("int32", "int8", "uint8"))


def heavy_kernels(mod: tvm.IRModule) -> list[KernelInfo]:
    """Every conv2d and matmul call in ``main``, with operand and result dtypes."""
    found: list[KernelInfo] = []

    def visit(expr):
        if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
            return
        if expr.op.name in HEAVY_OPS:
            ins = tuple(str(a.ty.dtype) for a in expr.args[:2])
            found.append(KernelInfo(expr.op.name, ins, str(expr.ty.dtype)))
        elif expr.op.name == "relax.call_tir":
            name = expr.args[0].name_hint.rstrip("0123456789")  # the builder numbers repeated kernels
            if name in HEAVY_KERNELS:
                ins = tuple(str(a.ty.dtype) for a in expr.args[1].fields[:2])
                found.append(KernelInfo(name, ins, str(expr.ty.dtype)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def count_ops(mod: tvm.IRModule, names: tuple[str, ...]) -> int:
    """Number of calls to any of the Relax ops ``names`` in ``main``."""
    n = 0

    def visit(expr):
        nonlocal n
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in names:
            n += 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return n


def fused_calls(mod: tvm.IRModule, spec) -> collections.Counter:
    """The PrimFuncs ``main`` calls after ``spec``'s backend schedule and fusion, by name (numbering dropped)."""
    from hago import build as hago_build
    from hago.backends import backend_of
    from hago.lower import fuse

    backend, target = backend_of(spec), hago_build.target_of(spec)
    fused = fuse(backend.schedule(mod, target), target, backend)
    found = collections.Counter()

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
            found[e.args[0].name_hint.rstrip("0123456789_")] += 1

    relax.analysis.post_order_visit(fused["main"], visit)
    return found
