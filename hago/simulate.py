"""simulate: the FP32 graph with simulated (fake) quantization on every edge.

HAGO's annotate stage puts ``simulated_quantize`` on each edge; here that is
a ``dequantize(quantize(x))`` pair with the edge's calibrated scale and zero
point, and integer layers get their weights rounded to the strategy's bits.
The result is a float program whose values carry the same rounding and
clipping as the integer build, which is what bit-width search and
calibration studies need: it changes nothing but constants between
strategies, and it runs on any device TVM builds for.

Runs after ``calibrate`` (it needs ranges). ``realize`` is the exact integer
twin; tests check the two agree.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as O

from .dynamic import fake_quantize_rows
from .graph import Graph
from .qparams import bias_scale_floor, container_dtype, quantize_weight, weight_qparams
from .strategy import Strategy


def _fake_quant(bb: relax.BlockBuilder, x, qp) -> relax.Expr:
    cdt = container_dtype(qp.dtype)
    scale = relax.const(np.float32(qp.scale), "float32")
    zp = relax.const(np.asarray(qp.zero_point).astype(cdt), cdt)
    lo, hi = np.iinfo(cdt).min, np.iinfo(cdt).max
    if (qp.qmin, qp.qmax) == (lo, hi):
        q = bb.emit(O.quantize(x, scale, zp, axis=-1, out_dtype=cdt))
    else:
        r = O.add(O.round(O.divide(x, scale)), relax.const(float(qp.zero_point), "float32"))
        q = bb.emit(O.astype(O.clip(r, qp.qmin, qp.qmax), cdt))
    return bb.emit(O.dequantize(q, scale, zp))


def _fake_weight(node, bits: int, input_scale: float | None) -> np.ndarray:
    axis = 0 if node.kind != "dense" else 1
    floor = bias_scale_floor(node.bias, input_scale) if input_scale else None
    qp = weight_qparams(node.weight, axis, bits, min_scale=floor)
    shape = [1] * node.weight.ndim
    shape[axis] = -1
    return (quantize_weight(node.weight, qp).astype(np.float32) * qp.scale.reshape(shape)).astype(np.float32)


def simulate(graph: Graph, strategy: Strategy) -> tvm.IRModule:
    """Return the FP32 ``main`` of ``graph`` with fake quantization per ``strategy``."""
    bb = relax.BlockBuilder()
    func = graph.func
    params = [relax.Var(p.name, p.ty) for p in func.params]
    remap: dict = {}
    edge_of_var = {v: e for e, v in graph.edge_var.items()}
    node_of_var = {n.var: n for n in graph.nodes}

    def subst(expr):
        if isinstance(expr, relax.Var):
            return remap.get(expr, expr)
        if isinstance(expr, relax.Call):
            return relax.Call(expr.op, [subst(a) for a in expr.args], expr.attrs, expr.ty_args)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([subst(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(subst(expr.tuple_value), expr.index)
        return expr

    def after(var, value):
        edge = edge_of_var.get(var)
        choice = strategy.edges.get(edge) if edge else None
        if choice is not None and choice.bits and choice.alias_of is None and choice.dynamic:
            value = fake_quantize_rows(bb, value)  # per-row parameters at run time, as realize does
        elif choice is not None and choice.bits and choice.alias_of is None and choice.qparams is not None:
            value = _fake_quant(bb, value, choice.qparams)
        remap[var] = value

    attrs = {k: v for k, v in func.attrs.items()} if func.attrs else None
    with bb.function("main", params, attrs=attrs):
        with bb.dataflow():
            for old, new in zip(func.params, params):
                after(old, new)
            for blk in func.body.blocks:
                for b in blk.bindings:
                    value = b.value
                    node = node_of_var.get(b.var)
                    if node is not None and node.weighted and strategy.ops[node.name].mode == "integer":
                        qx = strategy.resolved(node.inputs[0]).qparams
                        sx = float(qx.scale) if qx is not None else None
                        w = relax.const(_fake_weight(node, strategy.ops[node.name].weight_bits, sx), "float32")
                        value = relax.Call(value.op, [value.args[0], w], value.attrs, value.ty_args)
                    after(b.var, bb.emit(subst(value)))
            out = bb.emit_output(subst(func.body.body))
        bb.emit_func_output(out)
    return relax.transform.Normalize()(bb.get())
