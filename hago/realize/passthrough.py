"""Pass-through ops: relu / clip / max-pool / reshape run on the integer tensor and keep its scale.

Each commutes with the monotone affine map ``real = s * (q - zp)``, so the
integer op on ``q`` is the float op on ``real``: relu and clip become a clip
in the quantized domain, max-pool and reshapes are the same op on integers.
On a backend's native layout (x86 NCHW16c) relu/clip run as they are and
max-pool as a pool of that layout; a reshape needs the plain layout.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as O

from hago.graph import Node
from hago.qparams import QParams

from .registry import OpHandler


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def activation_bounds(node: Node, qp: QParams) -> tuple[int, int]:
    """The integer range a relu / clip node keeps of a tensor quantized by ``qp``."""
    if node.kind == "relu":
        return int(qp.zero_point), int(qp.qmax)
    lo, hi = (float(v.value) for v in node.call.args[1:3])
    return (int(np.clip(np.round(lo / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)),
            int(np.clip(np.round(hi / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)))


class PassThrough(OpHandler):
    kinds = ("relu", "clip", "max_pool2d", "reshape")

    def takes_native(self, r, node, edge) -> bool:
        return node.kind in ("relu", "clip", "max_pool2d")

    def realize(self, r, node, choice) -> None:
        src = node.inputs[0]
        if node.name in r.absorbed:  # its producer's requantize clipped already: the same value
            for table in (r.native, r.qval):
                if src in table:
                    table[node.name] = table[src]
            return
        qp = r.qparams(src)
        layout = r.plan.layout
        native = src in r.native and (node.kind in ("relu", "clip")
                                      or (node.kind == "max_pool2d" and node.call.attrs.layout == layout.plain))
        q = r.native[src] if native else r.get_quant(src)[0]
        if node.kind in ("relu", "clip"):
            y = O.clip(q, *activation_bounds(node, qp))
        elif native:  # max-pool on the native layout: the padded channels stay at the zero point
            a = node.call.attrs
            y = O.nn.max_pool2d(q, _ints(a.pool_size), _ints(a.strides), _ints(a.padding), _ints(a.dilation),
                                bool(a.ceil_mode), layout=layout.name, out_layout=layout.name)
        else:  # max-pool and reshapes commute with a monotone affine map
            rest = [r.subst(a) for a in node.call.args[1:]]
            y = relax.Call(node.call.op, [q, *rest], node.call.attrs, node.call.ty_args)
        (r.native if native else r.qval)[node.name] = r.bb.emit(y)

