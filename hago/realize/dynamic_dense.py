"""Dynamic dense: a dense whose input edge annotate marked ``dynamic`` (spec ``activations.dynamic: [dense]``).

Its float input is quantized per row at run time (:mod:`hago.dynamic`), the
int8 weights are quantized once, and the output is float: no calibrated
range on either side. The backend's plan may still give the int32 matmul a
kernel (x86: VNNI on the uint8 rows). A multipoint layer (:mod:`.multipoint`)
runs its extra points as extra columns of that matmul, each rescaled with its
own coefficient, and adds them to their source columns in float before the bias.
"""

from __future__ import annotations

import numpy as np
from tvm.relax import op as O

from hago import dynamic
from hago.qparams import quantize_weight, weight_qparams

from . import multipoint
from .quant import const, shape
from .realizer import LayerConstants
from .weighted import Weighted


def _rows_key(r, edge: str) -> tuple:
    """What identifies ``edge``'s rows: the edge, or the tensor it reshapes when the reshape keeps the last axis.

    ``torch.export`` gives every ``nn.Linear`` on a 3-d input its own reshape
    to 2-d, so a transformer's Q, K and V projections read three reshape
    edges of one hidden state: the same rows, which are quantized once.
    """
    shape = tuple(r.edge_shape(edge))
    src = edge
    while (producer := r.g.producer(src)) is not None and producer.kind == "reshape":
        up = producer.inputs[0]
        if list(r.edge_shape(up))[-1:] != list(shape)[-1:]:
            break
        src = up
    return src, shape


class DynamicDense(Weighted):
    """Registered before :class:`~hago.realize.weighted.Weighted`, so it takes the dense layers it applies to."""

    kinds = ("dense",)

    def applies(self, strategy, node) -> bool:
        return bool(strategy.resolved(node.inputs[0]).dynamic)

    def takes_native(self, r, node, edge) -> bool:
        return False

    def realize(self, r, node, choice) -> None:
        wqp = weight_qparams(node.weight, 1, choice.weight_bits)
        wq = quantize_weight(node.weight, wqp)
        points = multipoint.layer_points(node, choice)  # extra output channels (hago.multipoint), or None
        # the kernel's weight and each column's scale: a multipoint layer's extra points after its channels
        wk = multipoint.widened(node, wq, points) if points is not None else wq
        scale_k = np.concatenate([wqp.scale, points.scales]) if points is not None else wqp.scale

        def matmul(bb, q, w):
            typed = bb.normalize(q)
            kernel = r.plan.dense_kernel(choice, str(typed.ty.dtype), shape(typed), w.shape)
            if kernel is not None:
                return kernel(bb, q, w)
            return O.matmul(q, const(w, "int8"), out_dtype="int32")

        src = node.inputs[0]
        x = r.get_float(src)
        key = _rows_key(r, src)
        if key not in r.rows:  # quantized once, however many dense layers read these rows
            kernel = r.plan.row_quantize_kernel(shape(r.bb.normalize(x)))
            r.rows[key] = kernel(r.bb, x) if kernel is not None else dynamic.emit_row_quantize(r.bb, x)
        if points is None:
            r.fval[node.name] = dynamic.emit_dense(r.bb, x, wq, wqp.scale, node.bias, matmul, rows=r.rows[key])
        else:  # the float weighted sum, then the bias
            y = dynamic.emit_dense(r.bb, x, wk, scale_k, None, matmul, rows=r.rows[key])
            y = multipoint.emit_float_sum(r.bb, y, node, points, wq.shape[1])
            r.fval[node.name] = r.bb.emit(O.add(y, const(node.bias, "float32"))) if node.bias is not None else y
        r.layers[node.name] = LayerConstants(wq, wqp.scale, np.zeros(wq.shape[1], np.int32))

