"""Float dense layers with a constant weight, laid out for ``hago.lower``'s default register tile.

That tile splits a float matmul's output columns into vectors, so:

* **Widths not in 4s** (1001 classes: TensorFlow-slim's MobileNets and
  Inceptions keep a background class; 10; 7) could not be tiled at all: the
  1280 x 1001 dense of such a classifier fell back to the naive loop nest,
  1.33 ms at batch 1 on session 15's EPYC against 0.06 ms for 1280 x 1000.
  The weight's columns are zero-padded to whole vectors and the result sliced.
* **Batch 1** (one row: every classifier head at batch 1) is a matrix-vector
  product, bound by streaming the weight. In ``[K, N]`` order a tile of 64
  columns reads 256 bytes from each of K rows 4 kB apart. The weight is
  stored instead as column panels ``[N/64, K, 64]`` (a batched matmul of the
  one row against every panel), so each tile streams one contiguous panel,
  and the ``[N/64, 1, 64]`` result is reshaped (a view) and sliced to ``N``.

* **Row counts with no divisor from 3 to 8** (197 tokens, a prime) are
  padded with zero rows to a multiple of 8, the padded rows sliced off.
* **One row per leading index** (``[tokens, 1, width]``): the leading dims
  become the rows of one 2-D product (a view each way).

Results are those of the plain matmul: every output column is the same sum
over ``K`` in the same order; padded columns are computed and dropped.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as O

#: output widths the default register tile takes as they are (see ``hago.lower._tileable``)
TILEABLE = 4
#: columns of one weight panel at batch 1: 4 vectors of 16 fp32 lanes, one tile's worth
PANEL = 64
#: a row count with no divisor from 3 to this is padded to a multiple of it (whole register tiles)
ROWS_PADDED = 8


def _static_shape(expr) -> list[int] | None:
    """``expr``'s shape as ints; None where a dim is symbolic or it has no shape."""
    try:
        return [int(d) for d in expr.ty.shape]
    except (TypeError, ValueError, AttributeError):
        return None


def _float_constant_dense(call: relax.Call) -> tuple[list[int], np.ndarray] | None:
    """``(x's shape, W)`` of a float ``matmul(x, W)`` with a constant 2-D weight and a static ``x``; else None."""
    if getattr(call.op, "name", "") != "relax.matmul" or len(call.args) != 2:
        return None
    x, w = call.args
    if not isinstance(w, tvm.ir.expr.Constant) or str(w.ty.dtype) != "float32" or str(x.ty.dtype) != "float32":
        return None
    if str(getattr(call.attrs, "out_dtype", "") or "") not in ("", "void", "float32"):
        return None
    value = w.value.numpy()
    shape = _static_shape(x)  # None with a symbolic batch: the calibration builds
    return (shape, value) if shape and value.ndim == 2 and shape[-1:] == [value.shape[0]] else None


def _rewrite(bb: relax.BlockBuilder, call: relax.Call, lanes: int) -> relax.Expr | None:
    found = _float_constant_dense(call)
    if found is None:
        return None
    shape, w = found
    x = call.args[0]
    if len(shape) == 1:  # a vector times the weight: no rows to tile, odd widths padded
        return _rewrite_rows(bb, x, 0, w, lanes)
    m = shape[-2]
    padded, rows = _pad_rows(bb, x, shape)
    if rows != m:
        # a register tile takes rows in whole tiles: 197 tokens (ViT-B/16), a prime, left a one-row tile
        # streaming the weight once per row
        return O.strided_slice(_product(bb, padded, rows, w, lanes), axes=[len(shape) - 2], begin=[0], end=[m])
    if len(shape) == 2 or m > 1:
        # [.., M, K] with M > 1 tiles its M rows already: kept as it is, its bias and activation stay fused
        return _rewrite_rows(bb, x, m, w, lanes)
    rows = int(np.prod(shape[:-1]))
    # one row per leading index: attention's in-projection on [tokens, 1, width] (torch's MultiheadAttention,
    # batch first off) was 50 one-row products, each streaming the whole weight; as one 2-D product its
    # leading dims are its rows (the reshape in between leaves its bias add a pass of its own)
    flat = bb.emit(O.reshape(x, [rows, shape[-1]]))
    return O.reshape(_product(bb, flat, rows, w, lanes), shape[:-1] + [w.shape[1]])


def _product(bb: relax.BlockBuilder, x: relax.Expr, m: int, w: np.ndarray, lanes: int) -> relax.Expr:
    """``x [.., m, K] @ w`` emitted, laid out for the tile where :func:`_rewrite_rows` lays it out."""
    out = _rewrite_rows(bb, x, m, w, lanes)
    return bb.emit(O.matmul(x, relax.const(w)) if out is None else out)


def _pad_rows(bb: relax.BlockBuilder, x: relax.Expr, shape: list[int]) -> tuple[relax.Expr, int]:
    """``(x, rows)`` with zero rows appended up to a multiple of ``ROWS_PADDED`` where its row count (dim -2)
    is :func:`_rows_untiled`; ``x`` itself otherwise."""
    m = shape[-2]
    if not _rows_untiled(m):
        return x, m
    extra = -m % ROWS_PADDED
    return bb.emit(O.nn.pad(x, [0, 0] * (len(shape) - 2) + [0, extra, 0, 0])), m + extra


def _rows_untiled(m: int) -> bool:
    """Whether ``m`` rows have no divisor from 3 to ``ROWS_PADDED``, so no register tile takes them whole."""
    return m > ROWS_PADDED and max(d for d in range(1, ROWS_PADDED + 1) if m % d == 0) < 3


def _rewrite_rows(bb: relax.BlockBuilder, x: relax.Expr, m: int, w: np.ndarray, lanes: int) -> relax.Expr | None:
    """``x [m, K] @ w`` laid out for the tile (module docstring); None where the plain matmul is that already."""
    k, n = w.shape
    if m == 1:  # one row: the weight as column panels
        np_ = -(-n // PANEL) * PANEL
        panels = np.ascontiguousarray(np.pad(w, ((0, 0), (0, np_ - n))).reshape(k, np_ // PANEL, PANEL)
                                      .transpose(1, 0, 2))
        wide = bb.emit(O.reshape(bb.emit(O.matmul(x, relax.const(panels))), [1, np_]))
    elif n % TILEABLE:
        wide = bb.emit(O.matmul(x, relax.const(np.pad(w, ((0, 0), (0, -n % lanes))))))
    else:
        return None
    return O.strided_slice(wide, axes=[-1], begin=[0], end=[n]) if int(wide.ty.shape[-1]) != n else wide


def _padded_product(bb: relax.BlockBuilder, call: relax.Call, lanes: int) -> relax.Expr | None:
    """A float matmul of two run-time operands (attention's ``q @ k^T``, ``p @ v``) padded to whole tiles.

    ViT-B/16's 197 tokens made ``[12, 197, 64] @ [12, 64, 197]`` untileable (197 columns: no whole vector)
    and its rows a prime: TVM's naive loop, 10 ms a layer. Columns are zero-padded to whole vectors, rows
    as :func:`_rewrite` pads them, and the product sliced back.
    """
    if getattr(call.op, "name", "") != "relax.matmul" or len(call.args) != 2:
        return None
    a, b = call.args
    if any(str(getattr(v.ty, "dtype", "")) != "float32" for v in (a, b)):
        return None
    sa, sb = _static_shape(a), _static_shape(b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return None
    m, n = sa[-2], sb[-1]
    pad_n = -n % lanes if n % TILEABLE else 0
    if not (_rows_untiled(m) or pad_n):
        return None
    a, _ = _pad_rows(bb, a, sa)
    if pad_n:
        b = bb.emit(O.nn.pad(b, [0, 0] * (len(sb) - 1) + [0, pad_n]))
    out = bb.emit(O.matmul(a, b))
    rank = len(out.ty.shape)
    return O.strided_slice(out, axes=[rank - 2, rank - 1], begin=[0, 0], end=[m, n])


def float_dense_layouts(mod: tvm.IRModule, lanes: int = 16) -> tvm.IRModule:
    """``mod`` with its float dense layers of constant weight laid out for the register tile (module docstring):
    batch-1 ones on ``[N/64, K, 64]`` column panels, other widths not in 4s padded to ``lanes``-wide vectors."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from hago.relax_rewrite import rewrite_relax_functions

    @mutator
    class _Layout(PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            out = _rewrite(self.builder_, call, lanes)
            if out is None:
                out = _padded_product(self.builder_, call, lanes)
            return call if out is None else out

    return rewrite_relax_functions(mod, _Layout(mod))
