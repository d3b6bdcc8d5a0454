"""The realize pass itself: one walk over ``main``'s bindings, each integer op through its handler.

:class:`Realizer` holds what the handlers share: the block builder, every
edge's value (float, plain integer, and integer in the plan's native layout,
each converted at most once), the requantize arithmetic and the plan. The
handlers (:mod:`.registry`) decide per op; the plan (:mod:`hago.backends`)
decides per layer which kernel and layout; nothing here knows a device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as O

from hago.backends import Plan
from hago.errors import QuantizeError
from hago.graph import Graph, Node, sole_reader
from hago.qparams import QParams, container_dtype, fixed_point_multiplier
from hago.strategy import Strategy

from .bf16 import bf16_call
from .quant import bias_shape, const, dequantize, quantize, shape, substitute
from .registry import handler_for


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


class Realizer:
    """One realize run (see the module docstring); handlers read and fill its tables."""

    def __init__(self, graph: Graph, strategy: Strategy, style: str, plan: Plan):
        self.g, self.s, self.style, self.plan = graph, strategy, style, plan
        self.bb = relax.BlockBuilder(graph.support_module())  # the importer's helpers main may call
        self.fval: dict[str, relax.Expr] = {}
        self.qval: dict[str, relax.Expr] = {}
        self.native: dict[str, relax.Expr] = {}  # edge -> its integer value in the plan's native layout
        self.rows: dict[str, tuple] = {}  # edge -> (q, scale, zp) of its per-row dynamic quantization
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

    def edge_shape(self, edge: str) -> list:
        """The plain (FP32 graph) shape of ``edge``."""
        return shape(self.g.edge_var[edge])

    def get_float(self, edge: str) -> relax.Expr:
        if edge not in self.fval:
            qp = self.qparams(edge)
            q, _ = self.get_quant(edge)
            self.fval[edge] = self.bb.emit(dequantize(q, qp))
        return self.fval[edge]

    def get_quant(self, edge: str) -> tuple[relax.Expr, QParams]:
        """The integer value of ``edge`` in its plain layout (converted from the native one at most once)."""
        qp = self.qparams(edge)
        if edge not in self.qval and edge in self.native:
            channels = int(self.edge_shape(edge)[1])
            self.qval[edge] = self.plan.layout.to_plain(self.bb, self.native[edge], channels)
        if edge not in self.qval:
            self.qval[edge] = self.bb.emit(quantize(self.get_float(edge), qp))
        return self.qval[edge], qp

    def get_native(self, edge: str) -> relax.Expr:
        """The integer value of ``edge`` in the plan's native layout (converted from the plain one at most once)."""
        if edge not in self.native:
            q, qp = self.get_quant(edge)
            self.native[edge] = self.plan.layout.to_native(self.bb, q, int(qp.zero_point))
        return self.native[edge]

    def native_from_float(self, edge: str) -> bool:
        """Quantize float-produced ``edge`` straight into the native layout, where the plan builds its float
        producer in that layout (then the layout change between them cancels); False: nothing emitted.
        """
        layout = self.plan.layout
        if (edge in self.qval or edge in self.native or layout is None or not self.plan.holds_native(edge)
                or self.plan.float_layout_produced(edge) != layout.name):
            return False
        qp = self.qparams(edge)
        if qp.per_channel:
            return False
        moved = layout.float_to_native(self.bb, self.get_float(edge))
        if moved is None:
            return False
        self.native[edge] = self.bb.emit(quantize(moved, qp))
        return True

    def takes_native(self, name: str, edge: str) -> bool:
        """Whether integer node ``name`` would run on ``edge`` in the native layout rather than the plain one."""
        node, choice = self.g.node(name), self.s.ops[name]
        if choice.mode != "integer":
            return False
        handler = handler_for(self.s, node)
        return handler is not None and handler.takes_native(self, node, edge)

    def native_output(self, edge: str) -> bool:
        """Hold ``edge`` native when the plan allows it and some consumer takes it so."""
        return self.plan.holds_native(edge) and any(self.takes_native(c, edge) for c in self.g.consumers.get(edge, []))

    # ---- substitution for float ops ---------------------------------------
    def subst(self, expr):
        return substitute(expr, self._var_value)

    def _var_value(self, var: relax.Var) -> relax.Expr:
        if var in self.edge_of_var:
            return self.get_float(self.edge_of_var[var])
        return self.var_map.get(var, var)

    # ---- requantize ---------------------------------------------------------
    def requant(self, acc, real_scale, out: QParams, bshape) -> relax.Expr:
        """int32/int64 ``acc`` times ``real_scale`` -> ``out`` (zero point added, clipped)."""
        cdt = container_dtype(out.dtype)
        real = np.asarray(real_scale, np.float64)
        if self.style == "float":
            f = O.round(O.multiply(O.astype(acc, "float32"), const(real.reshape(bshape), "float32")))
            y = O.add(f, const(out.zero_point, "float32"))
            return O.astype(O.clip(y, out.qmin, out.qmax), cdt)
        r = self.bb.emit(self.fixed_point(acc, real, bshape))
        y = O.add(r, const(out.zero_point, "int64"))
        return O.astype(O.clip(y, out.qmin, out.qmax), cdt)

    def fixed_point(self, acc, real: np.ndarray, bshape) -> relax.Expr:
        """round_half_away_from_zero(acc * M / 2^shift) in int64, without zero point or clip."""
        mult, shift = fixed_point_multiplier(real, self.style)
        shift = shift.astype(np.int64)
        p = self.bb.emit(O.multiply(O.astype(acc, "int64"), const(mult.reshape(bshape), "int64")))
        half = const((np.int64(1) << (shift - 1)).reshape(bshape), "int64")
        mag = self.bb.emit(O.right_shift(O.add(O.abs(p), half), const(shift.reshape(bshape), "int64")))
        return O.where(O.less(p, const(0, "int64")), O.negative(mag), mag)

    # ---- nodes -------------------------------------------------------------
    def float_node(self, node: Node) -> None:
        v = self.bb.emit(self.subst(node.call))
        if node.bias is not None:
            v = self.bb.emit(O.add(v, const(node.bias.reshape(bias_shape(node)), "float32")))
        self.fval[node.name] = v

    def bf16_node(self, node: Node) -> None:
        """A bf16 layer (:mod:`.bf16`) on the float value of its input, its bias added in float32.

        The plan's bf16 kernel where it has one (a dense), else the plain Relax
        op on bfloat16 operands, which the build blocks with its float
        neighbours and puts on the backend's kernel, the relu/relu6 after it
        in that kernel's write-back (``backends.cpu.bf16_epilogue``).
        """
        x = self.subst(node.call.args[0])
        kernel = self.plan.bf16_kernel(node, self.edge_shape(node.inputs[0]))
        if kernel is not None:
            self.fval[node.name] = kernel(self.bb, x)
            return
        v = self.bb.emit(bf16_call(node, x))
        if node.bias is not None:
            v = self.bb.emit(O.add(v, const(node.bias.reshape(bias_shape(node)), "float32")))
        self.fval[node.name] = v

    def sole_activation(self, name: str, mode: str) -> Node | None:
        """The relu / clip node of ``mode`` that alone reads ``name`` (not a network output), else None: what a
        kernel may apply in its own write-back (``Realizer.absorbed``), saving a pass over the tensor."""
        act = sole_reader(self.g, name)
        return act if act is not None and act.kind in ("relu", "clip") and self.s.ops[act.name].mode == mode else None

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
        if choice.mode == "bf16":
            self.bf16_node(node)
            return
        if choice.mode != "integer":
            self.float_node(node)
            return
        handler = handler_for(self.s, node)
        if handler is None:
            raise QuantizeError(f"{node.name}: the strategy makes {node.kind} integer, but hago cannot realize "
                                f"{node.kind} in integer; mark it float")
        handler.realize(self, node, choice)
