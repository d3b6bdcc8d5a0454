"""Integer add: each input rescaled to the output scale by its own fixed-point multiplier, summed in int64, clipped.

An add whose output feeds only float ops has no integer output edge: it adds
in float. On a backend's native layout it runs blocked when an input already
is and both inputs have the output's shape (no broadcast).
"""

from __future__ import annotations

from tvm.relax import op as O

from hago.qparams import container_dtype

from .quant import const
from .registry import OpHandler


class Add(OpHandler):
    kinds = ("add",)

    def takes_native(self, r, node, edge) -> bool:
        return True

    def realize(self, r, node, choice) -> None:
        if not r.s.edges[node.name].bits:  # feeds only float ops: add in float
            a, b = (r.get_float(e) for e in node.inputs)
            r.fval[node.name] = r.bb.emit(O.add(a, b))
            return
        qy = r.qparams(node.name)
        native = (any(e in r.native for e in node.inputs) and r.plan.holds_native(node.name)
                  and all(r.edge_shape(e) == r.edge_shape(node.name) for e in node.inputs))
        terms = []
        for e in node.inputs:
            qp = r.qparams(e)
            q = r.get_native(e) if native else r.get_quant(e)[0]
            centred = O.subtract(O.astype(q, "int64"), const(qp.zero_point, "int64"))
            terms.append(r.bb.emit(r.fixed_point(centred, float(qp.scale) / float(qy.scale), ())))
        y = O.add(O.add(terms[0], terms[1]), const(qy.zero_point, "int64"))
        out = r.native if native else r.qval
        out[node.name] = r.bb.emit(O.astype(O.clip(y, qy.qmin, qy.qmax), container_dtype(qy.dtype)))

