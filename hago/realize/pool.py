"""Integer global average pool: the codes summed in int32 over H and W, requantized to the output's scale.

``mean(s_x (q - z_x)) / s_y = (sum(q) - H W z_x) * s_x / (H W s_y)``: one
int32 reduction and the layer's own requantize (fixed point or float, as the
spec says). It reads a blocked (NCHW16c) tensor as it is: the sum runs per
channel lane, and the padded channels, all ``z_x``, come out at ``z_y``, as
the blocked layout wants them. A squeeze-excitation's pool (``relax.mean``
over H and W, :func:`hago.graph._spatial_mean`) reads the 8-bit output of
the conv before it, where a float pool would read that output dequantized
and unblocked (EfficientNet-B0: a float32 copy of each block's widest tensor).
"""

from __future__ import annotations

import numpy as np
from tvm.relax import op as O

from .quant import const
from .registry import OpHandler


def _keepdims(node) -> bool:
    return node.relax_op != "relax.mean" or bool(node.call.attrs.keepdims)


class GlobalAvgPool(OpHandler):
    kinds = ("global_avg_pool2d",)

    def takes_native(self, r, node, edge) -> bool:
        return _keepdims(node)  # [N, C/16, 1, 1, 16] stays blocked; a [N, C] output needs the plain channels

    def realize(self, r, node, choice) -> None:
        src = node.inputs[0]
        qx, qy = r.qparams(src), r.qparams(node.name)
        native = src in r.native and self.takes_native(r, node, src)
        q = r.native[src] if native else r.get_quant(src)[0]
        h, w = (int(d) for d in r.edge_shape(src)[2:4])
        total = r.bb.emit(O.sum(O.astype(q, "int32"), axis=[2, 3], keepdims=_keepdims(node)))
        acc = r.bb.emit(O.subtract(total, const(h * w * int(qx.zero_point), "int32")))
        real = np.array([float(qx.scale) / (h * w * float(qy.scale))])
        (r.native if native else r.qval)[node.name] = r.bb.emit(r.requant(acc, real, qy, (1,)))
