"""The bytes a program's weights take: what a 4-bit build saves, next to its latency.

Counted on the Relax module that is built (the FP32 one, or the realized
integer one with its kernels' packed weights), as the sum of the ``nbytes``
of its weight constants. A constant is a weight when at least two of its
axes are longer than 1: dense and conv weights (plain or packed for a
kernel), never a bias, a per-channel scale or a zero point, which are 1-D
or broadcast shapes such as ``(1, C, 1, 1)``. A constant used twice counts
once.
"""

from __future__ import annotations


def is_weight(shape) -> bool:
    """Whether a constant of ``shape`` counts as a weight (two or more axes longer than 1)."""
    return sum(1 for d in shape if int(d) > 1) >= 2


def weight_bytes(mod) -> int:
    """Sum of ``nbytes`` over the distinct weight constants of every Relax function in ``mod``."""
    import numpy as np
    import tvm
    from tvm import relax

    seen: dict[int, int] = {}  # data pointer -> bytes

    def visit(e):
        if isinstance(e, tvm.ir.expr.Constant) and isinstance(e.value, tvm.runtime.Tensor) and is_weight(e.value.shape):
            seen[e.value.data_ptr()] = int(e.value.numel()) * np.dtype(str(e.value.dtype)).itemsize

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sum(seen.values())


def format_bytes(n: int | None) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as model sizes are quoted); None -> ``"-"``."""
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
