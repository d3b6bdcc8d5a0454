"""dynamic: per-row activation quantization computed at run time, for integer dense layers.

A static per-tensor uint8 range cannot hold heavy-tailed activations: in a
BERT the FFN down-projection reads GELU's output and the projections read
layer-norm outputs whose few large channels set the range for every token.
Calibrating one range for all of them either clips the tail or leaves most
tokens a handful of levels (MiniLM loses 0.02 Spearman on SimLex-999 that
way). Where the spec allows it (``activations.dynamic`` lists ``dense``),
annotate marks such a float-to-integer edge ``dynamic``: each row (token) of
``x [..., K]`` gets its own asymmetric uint8 parameters, computed on the fly:

* ``lo = min(min(x_row), 0)``, ``hi = max(max(x_row), 0)`` (0 stays exact);
* ``scale = (hi - lo) / 255`` (1 for an all-zero row), ``zp = clip(round(-lo / scale), 0, 255)``;
* ``q = clip(round(x * (1 / scale)) + zp, 0, 255)`` as uint8 (one division per row, then a multiply
  per element: a vector division costs ten times a multiply, and this pass runs on every token);

and the integer product is corrected and rescaled per row and column:

* ``acc = q @ w_q`` (int32, through the VNNI kernel where it applies);
* ``y = float32(acc - zp * sum_k(w_q)) * scale * w_scale + bias``.

The edge was float anyway (its producer is a float op), so the range pass
is one extra read of a tensor already in cache, and the quantize it feeds
was needed regardless. This is what ONNX Runtime's ``quantize_dynamic``
does per tensor; per row is as cheap and tighter. Rounding is half to even
(``relax.op.round``), all in float32, so a numpy reference with the same
float32 operations reproduces it bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import relax
from tvm.relax import op as O

QMAX = 255


def _c(value, dtype: str) -> relax.Constant:
    return relax.const(np.asarray(value).astype(dtype), dtype)


def emit_row_quantize(bb: relax.BlockBuilder, x: relax.Expr) -> tuple[relax.Expr, relax.Expr, relax.Expr]:
    """``(q uint8, scale float32 [..., 1], zp int32 [..., 1])`` of float ``x`` per last-axis row."""
    zero = _c(0.0, "float32")
    lo = bb.emit(O.minimum(O.min(x, axis=-1, keepdims=True), zero))
    hi = bb.emit(O.maximum(O.max(x, axis=-1, keepdims=True), zero))
    span = bb.emit(O.subtract(hi, lo))
    scale = bb.emit(O.where(O.greater(span, zero), O.divide(span, _c(float(QMAX), "float32")), _c(1.0, "float32")))
    zp_f = bb.emit(O.clip(O.round(O.divide(O.negative(lo), scale)), 0, QMAX))
    inv = bb.emit(O.divide(_c(1.0, "float32"), scale))
    q = bb.emit(O.astype(O.clip(O.add(O.round(O.multiply(x, inv)), zp_f), 0, QMAX), "uint8"))
    return q, scale, bb.emit(O.astype(zp_f, "int32"))


def emit_dense(bb: relax.BlockBuilder, x: relax.Expr, w_q: np.ndarray, w_scale: np.ndarray,
               bias: np.ndarray | None, matmul: Callable[[relax.BlockBuilder, relax.Expr, np.ndarray], relax.Expr],
               rows: tuple | None = None) -> relax.Expr:
    """Float ``x [..., K] @ w`` through uint8 x int8 with per-row dynamic activation parameters.

    ``w_q`` is the int8 ``[K, N]`` weight with per-column scales ``w_scale``;
    ``matmul(bb, q_uint8, w_q)`` emits the int32 product (VNNI or plain).
    ``rows``: ``x``'s :func:`emit_row_quantize` already emitted (a
    transformer's Q, K and V projections read one input: quantized once).
    Returns the float32 output, bias included.
    """
    q, scale, zp = rows if rows is not None else emit_row_quantize(bb, x)
    acc = bb.emit(matmul(bb, q, w_q))
    wsum = w_q.astype(np.int64).sum(axis=0).astype(np.int32)
    centred = bb.emit(O.subtract(acc, O.multiply(zp, _c(wsum, "int32"))))
    y = O.multiply(O.multiply(O.astype(centred, "float32"), scale), _c(w_scale, "float32"))
    if bias is not None:
        y = O.add(y, _c(bias, "float32"))
    return bb.emit(y)


def fake_quantize_rows(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
    """The simulated twin: ``x`` rounded to its per-row uint8 grid and back to float."""
    q, scale, zp = emit_row_quantize(bb, x)
    return bb.emit(O.multiply(O.astype(O.subtract(O.astype(q, "int32"), zp), "float32"), scale))
