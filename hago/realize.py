"""realize: lower a calibrated strategy to a true integer Relax program.

Runs last among the passes (after ``annotate`` and ``calibrate``). Every op
the strategy marks ``integer`` becomes integer arithmetic:

* conv2d / dense: uint8|int8 activations x int8 weights with int32
  accumulation. Asymmetric inputs are padded with their zero point so
  ``(x - zp)`` is exactly 0 in the padding, and ``zp * sum(w)`` is folded with
  the bias into one int32 constant;
* requantize: the real scale ``s_x * s_w / s_y`` as an int32 multiplier and
  a right shift in int64, rounding half away from zero, then the output zero
  point and a clip (the ReLU floor rides on that clip);
* add: each input rescaled to the output scale by its own fixed-point
  multiplier, summed in int64, clipped;
* relu / clip / max-pool / reshape run on the integer tensor and keep its
  scale;
* a dense whose input edge is ``dynamic`` quantizes that float input per
  row at run time (:mod:`hago.dynamic`) and produces float.

Where the spec's descriptor names them, hago's hand-scheduled kernels
(:mod:`hago.kernels`) stand in for the plain ops: VNNI conv/dense, and the
depthwise kernel, which pads and requantizes inside its own loop nest.

On VNNI specs, integer activations between VNNI convs stay in the blocked
NCHW16c layout (``kernels.x86_vnni``: channels padded to 16 with the zero
point): the conv requantizes on its register tiles, and residual adds,
relu/clip, max-pool and depthwise convs (``kernels.x86_depthwise_blocked``)
run on the blocked tensor. The layout changes back to NCHW only where an op
needs it (a float op, a reshape).

Quantize and dequantize appear only where a float op meets an integer one,
and an integer layer that feeds only float ops is dequantized straight from
its int32 accumulator (no rounding to 8 bits on the way out).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as O

from . import dynamic, kernels
from .errors import QuantizeError
from .graph import Graph, Node
from .qparams import (QParams, bias_scale_floor, container_dtype, fixed_point_multiplier, quantize_weight,
                      weight_qparams)
from .strategy import Strategy


@dataclass
class LayerConstants:
    """The integer constants realize baked into one weighted layer (for tests and reports)."""

    weight_q: np.ndarray
    weight_scale: np.ndarray
    bias_i32: np.ndarray  # round(bias / (s_x * s_w)), before the zero-point term is folded in
    multiplier: np.ndarray | None = None
    shift: np.ndarray | None = None


@dataclass
class Realized:
    mod: tvm.IRModule
    layers: dict[str, LayerConstants] = field(default_factory=dict)


def _shape(expr) -> list:
    return [int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else d for d in expr.ty.shape]


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _c(value, dtype: str) -> relax.Constant:
    return relax.const(np.asarray(value).astype(dtype), dtype)


class _Realizer:
    def __init__(self, graph: Graph, strategy: Strategy, style: str):
        self.g, self.s, self.style = graph, strategy, style
        self.bb = relax.BlockBuilder(graph.support_module())  # the importer's helpers main may call
        self.fval: dict[str, relax.Expr] = {}
        self.qval: dict[str, relax.Expr] = {}
        self.blocked: dict[str, relax.Expr] = {}  # edge -> its uint8 NCHW16c value (see the module docstring)
        self.absorbed: set[str] = set()  # relu/clip nodes done by their producer kernel's requantize clip
        self.var_map: dict = {}
        self.edge_of_var = {v: e for e, v in graph.edge_var.items()}
        self.layers: dict[str, LayerConstants] = {}

    # ---- edge values -------------------------------------------------------
    def qparams(self, edge: str) -> QParams:
        qp = self.s.resolved(edge).qparams
        if qp is None:
            raise QuantizeError(f"edge {edge!r} has no calibrated parameters; calibrate before realize")
        return qp

    def get_float(self, edge: str) -> relax.Expr:
        if edge not in self.fval:
            qp = self.qparams(edge)
            q, _ = self.get_quant(edge)
            self.fval[edge] = self.bb.emit(
                O.dequantize(q, _c(qp.scale, "float32"), _c(qp.zero_point, container_dtype(qp.dtype)))
            )
        return self.fval[edge]

    def get_quant(self, edge: str) -> tuple[relax.Expr, QParams]:
        """The integer value of ``edge`` in its plain layout (converted from NCHW16c at most once)."""
        qp = self.qparams(edge)
        if edge not in self.qval and edge in self.blocked:
            self.qval[edge] = kernels.emit_from_blocked(self.bb, self.blocked[edge], self.channels(edge))
        if edge not in self.qval:
            x = self.get_float(edge)
            cdt = container_dtype(qp.dtype)
            lo, hi = np.iinfo(cdt).min, np.iinfo(cdt).max
            if (qp.qmin, qp.qmax) == (lo, hi):
                q = O.quantize(x, _c(qp.scale, "float32"), _c(qp.zero_point, cdt), axis=-1, out_dtype=cdt)
            else:  # sub-byte values in a byte container: clip to the narrower range
                r = O.add(O.round(O.divide(x, _c(qp.scale, "float32"))), _c(qp.zero_point, "float32"))
                q = O.astype(O.clip(r, qp.qmin, qp.qmax), cdt)
            self.qval[edge] = self.bb.emit(q)
        return self.qval[edge], qp

    # ---- the blocked NCHW16c layout ---------------------------------------
    def channels(self, edge: str) -> int:
        return int(_shape(self.g.edge_var[edge])[1])

    def get_blocked(self, edge: str) -> relax.Expr:
        """The uint8 NCHW16c value of ``edge`` (converted from NCHW at most once)."""
        if edge not in self.blocked:
            q, qp = self.get_quant(edge)
            self.blocked[edge] = kernels.emit_to_blocked(self.bb, q, int(qp.zero_point))
        return self.blocked[edge]

    def can_block(self, edge: str) -> bool:
        """Whether ``edge`` may be held blocked: a static 4-D uint8 integer tensor."""
        shape = _shape(self.g.edge_var[edge]) if edge in self.g.edge_var else []
        res = self.s.resolved(edge)
        return (len(shape) == 4 and all(isinstance(d, int) for d in shape) and bool(res.bits)
                and res.qparams is not None and container_dtype(res.qparams.dtype) == "uint8")

    def takes_blocked(self, name: str, edge: str) -> bool:
        """Whether integer node ``name`` would run on ``edge`` blocked rather than in NCHW."""
        node, choice = self.g.node(name), self.s.ops[name]
        if choice.mode != "integer":
            return False
        if node.kind in ("relu", "clip", "max_pool2d", "add"):
            return True
        if node.kind == "depthwise_conv2d":  # the blocked kernel writes 8 bits: an integer output only
            return (bool(self.s.edges[name].bits) and self.depthwise_kernel(choice, self.qparams(edge))
                    and node.weight.shape[0] == self.channels(edge))
        if node.kind == "conv2d" and node.inputs[0] == edge:
            xs = _shape(self.g.edge_var[edge])
            return (int(node.call.attrs.groups) == 1 and self.packed_layout(choice, self.qparams(edge))
                    and kernels.vnni_applicable("conv2d", xs, node.weight.shape, 1))
        return False

    def block_output(self, edge: str) -> bool:
        """Hold ``edge`` blocked when its producer can emit it so and some consumer takes it so."""
        return self.can_block(edge) and any(self.takes_blocked(c, edge) for c in self.g.consumers.get(edge, []))

    # ---- substitution for float ops ---------------------------------------
    def subst(self, expr):
        if isinstance(expr, relax.Var):
            if expr in self.edge_of_var:
                return self.get_float(self.edge_of_var[expr])
            return self.var_map.get(expr, expr)
        if isinstance(expr, relax.Call):
            return relax.Call(expr.op, [self.subst(a) for a in expr.args], expr.attrs, expr.ty_args)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self.subst(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(self.subst(expr.tuple_value), expr.index)
        return expr

    # ---- requantize ---------------------------------------------------------
    def requant(self, acc, real_scale, out: QParams, bshape) -> relax.Expr:
        """int32/int64 ``acc`` times ``real_scale`` -> ``out`` (zero point added, clipped)."""
        cdt = container_dtype(out.dtype)
        real = np.asarray(real_scale, np.float64)
        if self.style == "float":
            f = O.round(O.multiply(O.astype(acc, "float32"), _c(real.reshape(bshape), "float32")))
            y = O.add(f, _c(out.zero_point, "float32"))
            return O.astype(O.clip(y, out.qmin, out.qmax), cdt)
        r = self.bb.emit(self.fixed_point(acc, real, bshape))
        y = O.add(r, _c(out.zero_point, "int64"))
        return O.astype(O.clip(y, out.qmin, out.qmax), cdt)

    def fixed_point(self, acc, real: np.ndarray, bshape) -> relax.Expr:
        """round_half_away_from_zero(acc * M / 2^shift) in int64, without zero point or clip."""
        mult, shift = fixed_point_multiplier(real, self.style)
        shift = shift.astype(np.int64)
        p = self.bb.emit(O.multiply(O.astype(acc, "int64"), _c(mult.reshape(bshape), "int64")))
        half = _c((np.int64(1) << (shift - 1)).reshape(bshape), "int64")
        mag = self.bb.emit(O.right_shift(O.add(O.abs(p), half), _c(shift.reshape(bshape), "int64")))
        return O.where(O.less(p, _c(0, "int64")), O.negative(mag), mag)

    # ---- nodes -------------------------------------------------------------
    def float_node(self, node: Node) -> None:
        v = self.bb.emit(self.subst(node.call))
        if node.bias is not None:
            shape = (1, -1, 1, 1) if node.kind != "dense" else (-1,)
            v = self.bb.emit(O.add(v, _c(node.bias.reshape(shape), "float32")))
        self.fval[node.name] = v

    def weighted_node(self, node: Node, choice) -> None:
        if node.kind == "dense" and self.s.resolved(node.inputs[0]).dynamic:
            self.dynamic_dense(node, choice)
            return
        conv = node.kind != "dense"
        src = node.inputs[0]
        blocked_in = conv and src in self.blocked and self.takes_blocked(node.name, src)
        xq, qx = (self.blocked[src], self.qparams(src)) if blocked_in else self.get_quant(src)
        xs = _shape(self.g.edge_var[src]) if blocked_in else _shape(xq)
        w = node.weight
        axis = 0 if conv else 1
        sx, zx = float(qx.scale), int(qx.zero_point)
        wqp = weight_qparams(w, axis, choice.weight_bits, min_scale=bias_scale_floor(node.bias, sx))
        wq = quantize_weight(w, wqp)
        packed = self.packed_layout(choice, qx)
        acc_scale = sx * wqp.scale.astype(np.float64)
        bias = node.bias if node.bias is not None else np.zeros_like(acc_scale)
        bias_q = np.round(bias.astype(np.float64) / acc_scale)
        wsum = wq.astype(np.int64).reshape(wq.shape[0], -1).sum(axis=1) if conv else wq.astype(np.int64).sum(axis=0)
        # sum((x - zx) * w) = sum(x * w) - zx * sum(w): fold the zero-point term into the bias
        folded = bias_q - zx * wsum
        if np.abs(folded).max(initial=0) >= 2**31:
            raise QuantizeError(f"{node.name}: int32 bias overflows; the input scale is too small")
        consts = LayerConstants(wq, wqp.scale, bias_q.astype(np.int32))
        self.layers[node.name] = consts
        out = self.s.edges[node.name]
        qy = self.qparams(node.name) if out.bits else None
        real = acc_scale / float(qy.scale) if out.bits else None
        if out.bits and self.style != "float":
            consts.multiplier, consts.shift = fixed_point_multiplier(real, self.style)
        if conv:
            a = node.call.attrs
            pad = [int(p) for p in a.padding]  # (top, left, bottom, right)
            groups = int(a.groups)
            depthwise = self.depthwise_kernel(choice, qx) and kernels.depthwise_applicable(xs, wq.shape, groups)
            vnni = packed and kernels.vnni_applicable("conv2d", xs, wq.shape, groups)
            rq = None  # hago's kernels requantize in their own write-back when the output is integer
            if consts.multiplier is not None and (depthwise or vnni):
                rq = kernels.Requant(folded.astype(np.int32), consts.multiplier, consts.shift, int(qy.zero_point),
                                     int(qy.qmin), int(qy.qmax), container_dtype(qy.dtype))
                rq = self.absorb_activation(node.name, rq)
            if depthwise and blocked_in and rq is not None:  # NCHW16c in and out, pads itself
                self.blocked[node.name] = kernels.emit_conv2d_depthwise_blocked(
                    self.bb, xq, wq, rq, _ints(a.strides), pad, _ints(a.dilation), pad_value=zx)
                return
            if depthwise:  # pads itself (wider, for whole vectors)
                acc = kernels.emit_conv2d_depthwise(self.bb, xq, wq, _ints(a.strides), pad, _ints(a.dilation),
                                                    pad_value=zx, groups=groups, requant=rq)
            elif vnni:  # the NCHW -> NCHW16c conversion pads: no padded NCHW copy
                layout = "NCHW16c" if rq is not None and groups == 1 and self.block_output(node.name) else "NCHW"
                acc = kernels.emit_conv2d_vnni(self.bb, xq, wq, _ints(a.strides), _ints(a.dilation), groups,
                                               padding=pad, pad_value=zx, requant=rq, out_layout=layout)
                if layout != "NCHW":
                    self.blocked[node.name] = acc
                    return
            if rq is not None:
                self.qval[node.name] = acc
                return
            if not (depthwise or vnni):
                if any(pad):
                    top, left, bottom, right = pad
                    xq = self.bb.emit(O.nn.pad(xq, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zx)))
                acc = O.nn.conv2d(xq, _c(wq, "int8"), strides=a.strides, padding=0, dilation=a.dilation,
                                  groups=groups, out_dtype="int32")
            bshape = (1, -1, 1, 1)
        else:
            if packed and kernels.vnni_applicable("dense", xs, wq.shape):
                acc = kernels.emit_dense_vnni(self.bb, xq, wq)
            else:
                acc = O.matmul(xq, _c(wq, "int8"), out_dtype="int32")
            bshape = (-1,)
        if not isinstance(acc, relax.Var):  # (re-binding a kernel's output var would block its fusion)
            acc = self.bb.emit(acc)
        acc = self.bb.emit(O.add(acc, _c(folded.astype(np.int32).reshape(bshape), "int32")))
        if out.bits:
            self.qval[node.name] = self.bb.emit(self.requant(acc, real, qy, bshape))
        else:
            f = O.multiply(O.astype(acc, "float32"), _c(acc_scale.reshape(bshape), "float32"))
            self.fval[node.name] = self.bb.emit(f)

    def dynamic_dense(self, node: Node, choice) -> None:
        """Dense whose float input is quantized per row at run time (``hago.dynamic``); float output."""
        wqp = weight_qparams(node.weight, 1, choice.weight_bits)
        wq = quantize_weight(node.weight, wqp)
        vnni = (choice.descriptor or {}).get("weight_layout") in kernels.VNNI_WEIGHT_LAYOUTS

        def matmul(bb, q, w):
            if vnni and kernels.vnni_applicable("dense", _shape(bb.normalize(q)), w.shape):
                return kernels.emit_dense_vnni(bb, q, w)
            return O.matmul(q, _c(w, "int8"), out_dtype="int32")

        self.fval[node.name] = dynamic.emit_dense(self.bb, self.get_float(node.inputs[0]), wq, wqp.scale,
                                                  node.bias, matmul)
        self.layers[node.name] = LayerConstants(wq, wqp.scale, np.zeros(wq.shape[1], np.int32))

    @staticmethod
    def packed_layout(choice, qx: QParams) -> bool:
        """Whether the spec's descriptor asks for VNNI-packed weights (u8 x s8 blocked layouts)."""
        layout = (choice.descriptor or {}).get("weight_layout")
        return layout in kernels.VNNI_WEIGHT_LAYOUTS and container_dtype(qx.dtype) == "uint8"

    @staticmethod
    def depthwise_kernel(choice, qx: QParams) -> bool:
        """Whether to run hago's NCHW u8 x s8 depthwise kernel (x86 specs' depthwise descriptor).

        The descriptor names no packed layout (``layout: NCHW``); uint8 x int8
        NCHW is what the kernel takes. ``schedule_vnni`` schedules it on any
        LLVM CPU target.
        """
        d = choice.descriptor or {}
        return (choice.kind == "depthwise_conv2d" and d.get("layout", "NCHW") == "NCHW"
                and list(d.get("inputs", [])) == ["uint8", "int8"] and container_dtype(qx.dtype) == "uint8")

    def add_node(self, node: Node) -> None:
        if not self.s.edges[node.name].bits:  # feeds only float ops: add in float
            a, b = (self.get_float(e) for e in node.inputs)
            self.fval[node.name] = self.bb.emit(O.add(a, b))
            return
        qy = self.qparams(node.name)
        # blocked when an input already is and both have the output's shape (no broadcast)
        blocked = (any(e in self.blocked for e in node.inputs) and self.can_block(node.name)
                   and all(_shape(self.g.edge_var[e]) == _shape(self.g.edge_var[node.name]) for e in node.inputs))
        terms = []
        for e in node.inputs:
            qp = self.qparams(e)
            q = self.get_blocked(e) if blocked else self.get_quant(e)[0]
            centred = O.subtract(O.astype(q, "int64"), _c(qp.zero_point, "int64"))
            terms.append(self.bb.emit(self.fixed_point(centred, float(qp.scale) / float(qy.scale), ())))
        y = O.add(O.add(terms[0], terms[1]), _c(qy.zero_point, "int64"))
        out = self.blocked if blocked else self.qval
        out[node.name] = self.bb.emit(O.astype(O.clip(y, qy.qmin, qy.qmax), container_dtype(qy.dtype)))

    @staticmethod
    def activation_bounds(node: Node, qp: QParams) -> tuple[int, int]:
        """The integer range a relu / clip node keeps of a tensor quantized by ``qp``."""
        if node.kind == "relu":
            return int(qp.zero_point), int(qp.qmax)
        lo, hi = (float(v.value) for v in node.call.args[1:3])
        return (int(np.clip(np.round(lo / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)),
                int(np.clip(np.round(hi / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)))

    def absorb_activation(self, name: str, rq):
        """``rq`` with the clip of the relu/clip that alone consumes ``name`` folded in (see ``absorbed``).

        A kernel that requantizes in its own loop nest is opaque to FuseOps, so
        a relu6 after it would be one more pass over the tensor; clipping in
        the requantize is the same arithmetic. Only where the activation's
        output keeps the conv's scale and zero point (it always should).
        """
        users = self.g.consumers.get(name, [])
        if len(users) != 1 or name in self.g.outputs:
            return rq
        act = self.g.node(users[0])
        if act.kind not in ("relu", "clip") or self.s.ops[act.name].mode != "integer" or not self.s.resolved(act.name).bits:
            return rq
        qp, qa = self.qparams(name), self.qparams(act.name)
        if (float(qp.scale), int(qp.zero_point), qp.dtype) != (float(qa.scale), int(qa.zero_point), qa.dtype):
            return rq
        lo, hi = self.activation_bounds(act, qp)
        self.absorbed.add(act.name)
        return replace(rq, qmin=max(rq.qmin, lo), qmax=min(rq.qmax, hi))

    def passthrough_node(self, node: Node) -> None:
        src = node.inputs[0]
        if node.name in self.absorbed:  # its producer's requantize clipped already: the same value
            for table in (self.blocked, self.qval):
                if src in table:
                    table[node.name] = table[src]
            return
        qp = self.qparams(src)
        cdt = container_dtype(qp.dtype)
        blocked = src in self.blocked and (node.kind in ("relu", "clip")
                                           or (node.kind == "max_pool2d" and node.call.attrs.layout == "NCHW"))
        q = self.blocked[src] if blocked else self.get_quant(src)[0]
        if node.kind in ("relu", "clip"):
            y = O.clip(q, *self.activation_bounds(node, qp))
        elif blocked:  # max-pool on NCHW16c: the padded channels stay at the zero point
            a = node.call.attrs
            y = O.nn.max_pool2d(q, _ints(a.pool_size), _ints(a.strides), _ints(a.padding), _ints(a.dilation),
                                bool(a.ceil_mode), layout="NCHW16c", out_layout="NCHW16c")
        else:  # max-pool and reshapes commute with a monotone affine map
            rest = [self.subst(a) for a in node.call.args[1:]]
            y = relax.Call(node.call.op, [q, *rest], node.call.attrs, node.call.ty_args)
        (self.blocked if blocked else self.qval)[node.name] = self.bb.emit(y)

    def run(self) -> Realized:
        g = self.g
        params = [relax.Var(p.name, p.ty) for p in g.params]
        node_of_var = {n.var: n for n in g.nodes}
        attrs = {k: v for k, v in g.func.attrs.items()} if g.func.attrs else None
        with self.bb.function("main", params, attrs=attrs):
            with self.bb.dataflow():
                for old, new in zip(g.params, params):
                    self.fval[f"input:{old.name}"] = new
                for blk in g.func.body.blocks:
                    for b in blk.bindings:
                        self.binding(b, node_of_var)
                out = self.bb.emit_output(self.subst(g.func.body.body))
            self.bb.emit_func_output(out)
        mod = relax.transform.Normalize()(self.bb.get())
        return Realized(mod, self.layers)

    def binding(self, b, node_of_var) -> None:
        if b.var in self.g.fused_vars:
            return
        node = node_of_var.get(b.var)
        if node is None:
            self.var_map[b.var] = self.bb.emit(self.subst(b.value))
            return
        choice = self.s.ops[node.name]
        if choice.mode != "integer":
            self.float_node(node)
        elif node.weighted:
            self.weighted_node(node, choice)
        elif node.kind == "add":
            self.add_node(node)
        else:
            self.passthrough_node(node)


def realize(graph: Graph, strategy: Strategy, requantize: str = "fixed_point") -> Realized:
    """Lower ``graph`` under a calibrated ``strategy`` to an integer Relax module."""
    if requantize not in ("fixed_point", "float", "power_of_two"):
        raise QuantizeError(f"unknown requantize style {requantize!r}")
    missing = set(strategy.ops) ^ {n.name for n in graph.nodes}
    if missing:
        raise QuantizeError(f"strategy does not match the graph (nodes {sorted(missing)[:3]}...)")
    return _Realizer(graph, strategy, requantize).run()
