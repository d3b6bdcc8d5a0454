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


#: unit -> bytes, lower case: decimal (kB, MB, GB, as model sizes are quoted) and binary (KiB, MiB, GiB)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text) -> int:
    """``"2MB"`` -> 2000000, ``"1.5MiB"`` -> 1572864, ``"300000"`` or ``300000`` -> 300000: a size budget.

    Units are case-insensitive (``kB``/``KB``/``k`` are 1000 bytes, ``KiB`` 1024); the result is rounded
    down to whole bytes and must be at least 1. ValueError, with the accepted forms, for anything else.
    """
    import math
    import re

    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{text!r} is not a size: give bytes (300000) or a number with a unit "
                             "(2MB, 500kB, 1.5MiB; kB/MB/GB are 1000-based, KiB/MiB/GiB 1024-based)")
        value, unit = float(m.group(1)), m.group(2).lower()
    n = value * _UNITS[unit] if math.isfinite(value) else math.nan
    if not n >= 1 or not math.isfinite(n):
        raise ValueError(f"{text!r} is not a usable size: give at least 1 byte")
    return int(n)
