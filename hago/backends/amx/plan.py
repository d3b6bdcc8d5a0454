"""The AMX backend's plan: the x86 plan with AMX dense kernels (int8 for large M, bf16 always).

Which int8 dense goes to the tiles is a measured rule: with fewer than
:data:`AMX_MIN_ROWS` rows (a batch-1 classifier) the weights' memory traffic
bounds AMX and VNNI alike (1x512x1000: 8.2 us AMX, 8.3 us VNNI), and VNNI
needs no tile configuration.
"""

from __future__ import annotations

from ..x86.plan import X86Plan

#: fewest GEMM rows (M) for which an int8 dense goes to AMX rather than VNNI
AMX_MIN_ROWS = 16


def _rows(x_shape) -> int | None:
    try:
        rows = 1
        for d in list(x_shape)[:-1]:
            rows *= int(d)
        return rows
    except (TypeError, ValueError):
        return None


class AMXPlan(X86Plan):
    """The x86 plan with AMX dense kernels (int8 for large M, bf16 always)."""

    def dense_kernel(self, choice, x_dtype, x_shape, w_shape):
        rows = _rows(x_shape)
        if x_dtype == "uint8" and rows is not None and rows >= AMX_MIN_ROWS:
            from .dense import emit_dense_amx

            return lambda bb, x, w_q: emit_dense_amx(bb, x, w_q, "int8")
        return super().dense_kernel(choice, x_dtype, x_shape, w_shape)

    def bf16_kernel(self, node, x_shape):
        """bf16 dense: the AMX kernel now; bf16 conv: None, the plain Relax op the build legalizes onto AMX."""
        if node.kind == "dense" and _rows(x_shape) is not None:
            from .dense import emit_dense_amx

            return lambda bb, x: emit_dense_amx(bb, x, node.weight, "bf16", bias=node.bias)
        return None


