"""The quantize and substitute helpers realize and simulate share.

Simulate is realize's float twin: the same quantize of an edge (a
``quantize`` op, or round/clip for sub-byte values in a byte container), the
same weight rounding (per-channel, the scale floored so the int32 bias
cannot overflow), the same re-emission of the FP32 graph's float ops with
their inputs substituted. Written once here, the two cannot drift apart.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as O

from hago.errors import QuantizeError
from hago.graph import Node
from hago.qparams import (QParams, bias_scale_floor, container_dtype, fixed_weight_qparams, quantize_weight,
                           weight_qparams)


def const(value, dtype: str) -> relax.Constant:
    """``value`` as a Relax constant of ``dtype``."""
    return relax.const(np.asarray(value).astype(dtype), dtype)


def shape(expr) -> list:
    """The shape of a normalized expr, static dims as ints."""
    return [int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else d for d in expr.ty.shape]


def quantize(x: relax.Expr, qp: QParams) -> relax.Expr:
    """Float ``x`` quantized with ``qp`` into its container dtype (not emitted).

    A full-range dtype is one ``quantize`` op; sub-byte values in a byte
    container (4 bits in int8) are rounded and clipped to the narrower range.
    """
    cdt = container_dtype(qp.dtype)
    lo, hi = np.iinfo(cdt).min, np.iinfo(cdt).max
    if (qp.qmin, qp.qmax) == (lo, hi):
        return O.quantize(x, const(qp.scale, "float32"), const(qp.zero_point, cdt), axis=-1, out_dtype=cdt)
    r = O.add(O.round(O.divide(x, const(qp.scale, "float32"))), const(qp.zero_point, "float32"))
    return O.astype(O.clip(r, qp.qmin, qp.qmax), cdt)


def dequantize(q: relax.Expr, qp: QParams) -> relax.Expr:
    """Integer ``q`` back to float with ``qp`` (not emitted)."""
    return O.dequantize(q, const(qp.scale, "float32"), const(qp.zero_point, container_dtype(qp.dtype)))


def substitute(expr, var_value: Callable[[relax.Var], relax.Expr]):
    """``expr`` rebuilt with every variable replaced by ``var_value(var)`` (calls, tuples, tuple items)."""
    if isinstance(expr, relax.Var):
        return var_value(expr)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [substitute(a, var_value) for a in expr.args], expr.attrs, expr.ty_args)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([substitute(f, var_value) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(substitute(expr.tuple_value, var_value), expr.index)
    return expr


def weight_axis(node: Node) -> int:
    """The output-channel axis of a weighted node's weight: O of OIHW, N of a dense ``[K, N]``."""
    return 0 if node.kind != "dense" else 1


def bias_shape(node: Node) -> tuple[int, ...]:
    """How a weighted node's ``[C]`` bias broadcasts onto its output."""
    return (1, -1, 1, 1) if node.kind != "dense" else (-1,)


def quantize_layer_weight(node: Node, bits: int, input_scale: float | None,
                          scale: list[float] | None = None) -> tuple[np.ndarray, QParams]:
    """``(w_q, qparams)``: the node's weight per output channel at ``bits``.

    With the input scale known, the weight scale is floored so that
    ``bias / (s_x * s_w)`` fits an int32 (:func:`~hago.qparams.bias_scale_floor`).
    A given per-channel ``scale`` (``OpChoice.weight_scale``, the steps
    :mod:`hago.qat` trained) is used as it is, with no floor: its weights
    were trained on that grid, and a realize that moved it would change the
    integers the training settled on (an int32 overflow still fails in realize).
    """
    if scale is not None:
        qp = given_weight_qparams(node, bits, scale)
    else:
        floor = bias_scale_floor(node.bias, input_scale) if input_scale else None
        qp = weight_qparams(node.weight, weight_axis(node), bits, min_scale=floor)
    return quantize_weight(node.weight, qp), qp


def given_weight_qparams(node: Node, bits: int, scale: list[float]) -> QParams:
    """Symmetric narrow-range ``bits``-bit weight parameters with the strategy's own per-channel ``scale``."""
    s = np.asarray(scale, np.float32)
    channels = node.weight.shape[weight_axis(node)]
    if s.shape != (channels,):
        raise QuantizeError(f"strategy's weight_scale for {node.name} has {s.size} values for {channels} output "
                            "channels; re-run hago compile (or re-export the trained model: hago qat)")
    return fixed_weight_qparams(s, weight_axis(node), bits)


def fake_quantized_weight(node: Node, bits: int, input_scale: float | None,
                          scale: list[float] | None = None) -> np.ndarray:
    """The float32 weight realize's integer weight stands for (simulate's weight)."""
    w_q, qp = quantize_layer_weight(node, bits, input_scale, scale)
    scale_shape = [1] * node.weight.ndim
    scale_shape[weight_axis(node)] = -1
    return (w_q.astype(np.float32) * qp.scale.reshape(scale_shape)).astype(np.float32)
