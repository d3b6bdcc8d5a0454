"""Float dense layers whose output width the register tile cannot split: padded to whole vectors, then sliced.

``hago.lower``'s default schedule tiles a float matmul's output columns in
vectors, so it needs the width to be a multiple of 4. A classifier with 1001
classes (TensorFlow-slim's MobileNets and Inceptions keep a background class)
is not, and its 1280 x 1001 dense fell back to the naive loop nest: 1.33 ms at
batch 1 on session 15's EPYC, against 0.06 ms for 1280 x 1000. Here the
constant weight ``[K, N]`` gets zero columns up to a multiple of the vector
lanes, the matmul computes them, and a ``strided_slice`` drops them again
(the slice and the bias add after it are one small pass over ``N`` values).
Results are unchanged: the padded columns are separate outputs, and the kept
ones are summed in the same order.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as O

#: output widths the default register tile takes as they are (see ``hago.lower._tileable``)
TILEABLE = 4


def _padded_weight(call: relax.Call, lanes: int) -> np.ndarray | None:
    """The zero-padded ``[K, Np]`` weight of a float ``matmul(x, W)`` whose ``N`` the tile cannot split; else None."""
    if getattr(call.op, "name", "") != "relax.matmul" or len(call.args) != 2:
        return None
    x, w = call.args
    if not isinstance(w, tvm.ir.expr.Constant) or str(w.ty.dtype) != "float32" or str(x.ty.dtype) != "float32":
        return None
    if str(getattr(call.attrs, "out_dtype", "") or "") not in ("", "void", "float32"):
        return None
    value = w.value.numpy()
    if value.ndim != 2 or value.shape[1] % TILEABLE == 0:
        return None
    n = value.shape[1]
    return np.pad(value, ((0, 0), (0, -n % lanes)))


def pad_float_dense(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """``mod`` with every float ``matmul(x, W)`` of a constant weight whose width is not a multiple of 4 computed
    on whole ``lanes``-wide vectors and sliced back (see the module docstring)."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from hago.relax_rewrite import rewrite_relax_functions

    @mutator
    class _Pad(PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            padded = _padded_weight(call, lanes)
            if padded is None:
                return call
            n = int(call.args[1].ty.shape[1])
            wide = self.builder_.emit(O.matmul(call.args[0], relax.const(padded)))
            return O.strided_slice(wide, axes=[-1], begin=[0], end=[n])

    return rewrite_relax_functions(mod, _Pad(mod))
