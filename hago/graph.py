"""A read-only view of a prepared Relax ``main`` as hago's op graph.

Annotate, calibrate and realize all need the same facts about the FP32 graph:
which bindings are convolutions or dense layers, which constant is a weight
and which add is a bias, who consumes each tensor. Computing them once here
keeps the passes small and guarantees they agree on node names, which are the
keys of the strategy JSON.

Node kinds are the op names of the hardware spec (``conv2d``, ``dense``,
``add``, ``relu`` ...), and ``take`` for an embedding lookup (a constant
float table, row ids computed at run time; :mod:`hago.embedding4`). A call hago does not know becomes kind ``other`` and
always stays in float.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from .errors import QuantizeError

#: Ops that only move or select values: integer in, same integer out, same scale.
PASSTHROUGH = ("relu", "clip", "max_pool2d", "reshape")
#: Ops whose integer form multiplies by a constant weight.
WEIGHTED = ("conv2d", "depthwise_conv2d", "dense")
#: Ops that, in integer, read their producer's int32 accumulator in float (never a quantized tensor) and
#: quantize their own output: a SiLU, which a conv applies in its requantizing write-back.
ACCUMULATOR_READERS = ("silu",)

_RESHAPE_OPS = {"relax.reshape", "relax.permute_dims", "relax.flatten", "relax.squeeze", "relax.expand_dims"}


@dataclass
class Node:
    """One op of the FP32 graph, with a fused bias add where there is one."""

    name: str
    kind: str
    call: relax.Call
    var: relax.Var
    out_var: relax.Var
    inputs: list[str] = field(default_factory=list)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    relax_op: str = ""
    #: ``(mean, std)`` per output channel of the batch norm folded into this layer at prepare
    #: (:func:`hago.prepare.fold_batch_norm`): the statistics of its output, bias included; None without one
    bn_stats: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def weighted(self) -> bool:
        return self.kind in WEIGHTED


@dataclass
class Graph:
    """Nodes in topological order plus the edge bookkeeping the passes share.

    An *edge* is named after the node that produces it, or ``input:<param>``
    for a graph input. ``consumers[edge]`` lists node names; ``outputs`` are
    the edges that leave the function.
    """

    func: relax.Function
    nodes: list[Node]
    params: list[relax.Var]
    consumers: dict[str, list[str]]
    outputs: list[str]
    edge_var: dict[str, relax.Var]
    fused_vars: set = field(default_factory=set)
    module: tvm.IRModule | None = None

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}
        self._edge_of_var = {v: e for e, v in self.edge_var.items()}

    def producer(self, edge: str) -> Node | None:
        return self._by_name.get(edge)

    def edge_of(self, var) -> str | None:
        """The edge a variable of ``main`` carries, None for one that is no edge."""
        return self._edge_of_var.get(var)

    def support_module(self) -> tvm.IRModule:
        """Every function of the analyzed module but ``main``, under the same global vars.

        ``main`` may call helpers the importer added (TVM's ONNX importer
        emits ``Clip`` and ``Pad`` as ``call_tir`` of PrimFuncs it names
        ``maximum``, ``pad`` ...). A pass that builds a new ``main`` from this
        graph must start from this module, or those calls point nowhere.
        """
        return module_without_main(self.module)


def accumulator_reader(graph: "Graph", strategy, name: str) -> Node | None:
    """The integer :data:`ACCUMULATOR_READERS` node that alone reads layer ``name`` (not a network output).

    Where there is one, the layer's kernel writes that node's quantized
    output, the activation applied on its register tile; the layer's own
    edge never exists as a tensor.
    """
    node = sole_reader(graph, name)
    return node if node is not None and node.kind in ACCUMULATOR_READERS and strategy.ops[node.name].mode == "integer" \
        else None


def sole_reader(graph: "Graph", name: str) -> Node | None:
    """The one node that reads edge ``name``, None when several do or it is a network output: where a layer's
    kernel may apply that node in its own write-back."""
    users = graph.consumers.get(name, [])
    return graph.node(users[0]) if len(users) == 1 and name not in graph.outputs else None


def module_without_main(mod: tvm.IRModule | None) -> tvm.IRModule:
    """``mod``'s functions other than ``main`` (same ``GlobalVar`` objects), as a new module."""
    if mod is None:
        return tvm.IRModule({})
    funcs = {gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}
    attrs = {k: v for k, v in mod.attrs.items()} if mod.attrs else None
    return tvm.IRModule(funcs, attrs=attrs, global_infos=dict(mod.global_infos.items()))


def with_main(mod: tvm.IRModule, main: relax.Function) -> tvm.IRModule:
    """``mod`` with ``main`` replaced, every other function kept (see :meth:`Graph.support_module`)."""
    out = module_without_main(mod)
    out["main"] = main
    return out


#: Module attribute holding the statistics of folded batch norms: ``{weight_key(folded weight): [[mean], [std]]}``.
#: On the module, not on ``main``: the graph hash (``main``'s) is the same with or without them.
BN_STATS_ATTR = "hago_bn_stats"


def weight_key(w: np.ndarray) -> str:
    """A layer's identity across passes that keep its weight: a digest of the float32 weight bytes."""
    return hashlib.sha1(np.ascontiguousarray(w, np.float32).tobytes()).hexdigest()[:20]


def bn_stats(mod: tvm.IRModule) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The folded batch norms' output statistics kept on ``mod`` (:data:`BN_STATS_ATTR`), by weight key."""
    attrs = mod.attrs
    if attrs is None or BN_STATS_ATTR not in attrs:
        return {}
    out = {}
    for k, v in attrs[BN_STATS_ATTR].items():
        a = v.numpy().astype(np.float64)
        out[str(k)] = (a[0], a[1])
    return out


def with_bn_stats(mod: tvm.IRModule, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> tvm.IRModule:
    """``mod`` with :data:`BN_STATS_ATTR` set to ``stats`` (replacing what it held)."""
    value = {k: tvm.runtime.tensor(np.stack([np.asarray(m, np.float32), np.asarray(s, np.float32)]))
             for k, (m, s) in stats.items()}
    return mod.with_attr(BN_STATS_ATTR, tvm.runtime.convert(value))


def _const_value(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    return None


def _op_name(call: relax.Call) -> str:
    """``relax.nn.conv2d`` ...; a ``call_tir`` is named after its callee (``call_tir einsum``) for reports."""
    if isinstance(call.op, tvm.ir.Op):
        if call.op.name == "relax.call_tir" and isinstance(call.args[0], tvm.ir.GlobalVar):
            return f"call_tir {call.args[0].name_hint}"
        return call.op.name
    return str(call.op)


def _classify(call: relax.Call) -> tuple[str, np.ndarray | None]:
    """Map a Relax call to a spec op kind and its constant weight, if any."""
    op = _op_name(call)
    args = call.args
    if op == "relax.nn.conv2d":
        w = _const_value(args[1])
        a = call.attrs
        if w is None or a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
            return "other", None
        groups = int(a.groups)
        kind = "depthwise_conv2d" if groups > 1 and w.shape[1] == 1 and groups == w.shape[0] else "conv2d"
        return kind, w
    if op == "relax.matmul":
        w = _const_value(args[1])
        if w is not None and w.ndim == 2 and _const_value(args[0]) is None:
            return "dense", w
        if w is None and _const_value(args[0]) is None:
            return "batch_matmul", None
        return "other", None
    if op == "relax.add":
        if _const_value(args[0]) is None and _const_value(args[1]) is None:
            return "add", None
        return "other", None
    simple = {
        "relax.nn.relu": "relu",
        "relax.clip": "clip",
        "relax.nn.max_pool2d": "max_pool2d",
        "relax.nn.avg_pool2d": "avg_pool2d",
        "relax.concat": "concatenate",
        "relax.nn.silu": "silu",
    }
    if op == "relax.nn.adaptive_avg_pool2d":
        size = [int(v) for v in call.attrs.output_size] if call.attrs.output_size is not None else [1]
        return ("global_avg_pool2d" if set(size) == {1} and call.attrs.layout == "NCHW" else "other"), None
    if op == "relax.mean" and _spatial_mean(call):
        return "global_avg_pool2d", None
    if op == "relax.multiply" and channel_scale_operands(call) is not None:
        return "multiply", None
    if op in simple:
        return simple[op], None
    if op == "relax.take" and embedding_table(call) is not None:
        return "take", None  # its table stays on the call: a lookup has no weight a matmul cost counts
    if op in _RESHAPE_OPS:
        return "reshape", None
    return "other", None


def _dims(expr) -> list | None:
    """``expr``'s shape (constant dimensions as ints, a symbolic batch as its expression), None if unknown."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if not isinstance(shape, relax.ShapeExpr):
        return None
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in shape.values]


def _spatial_mean(call: relax.Call) -> bool:
    """Whether ``call`` (a ``relax.mean``) averages a 4-D NCHW tensor over H and W: a global average pool."""
    shape = _dims(call.args[0])
    axis = call.attrs.axis
    if shape is None or len(shape) != 4 or axis is None:
        return False
    return sorted(int(a) % 4 for a in axis) == [2, 3]


def channel_scale_operands(call: relax.Call) -> tuple[int, int] | None:
    """``(data, gate)`` argument positions of ``multiply(x [N,C,H,W], g [N,C,1,1])``, neither constant, else None.

    A squeeze-excitation's gate: kind ``multiply``, integer on its data
    operand (:mod:`hago.realize.scale`) with the gate read in float.
    """
    if len(call.args) != 2 or any(_const_value(a) is not None for a in call.args) or call.args[0].same_as(call.args[1]):
        return None
    shapes = [_dims(a) for a in call.args]
    if any(s is None or len(s) != 4 or not all(isinstance(d, int) for d in s[1:]) for s in shapes):
        return None
    for data, gate in ((0, 1), (1, 0)):
        x, g = shapes[data], shapes[gate]
        if g[1:] == [x[1], 1, 1] and x[2] * x[3] > 1 and str(g[0]) == str(x[0]):
            return data, gate
    return None


def quantized_inputs(graph: "Graph", node: Node) -> list[str]:
    """The input edges integer ``node`` reads as integer tensors (a float-read input is never quantized for it).

    An embedding lookup reads its row ids as they are, a SiLU its producer's
    accumulator, a channel scale its gate in float.
    """
    if node.kind == "take" or node.kind in ACCUMULATOR_READERS:
        return []
    if node.kind == "multiply":
        data, _ = channel_scale_operands(node.call)
        edge = graph.edge_of(node.call.args[data])
        return [edge] if edge is not None else []
    return list(node.inputs)


def embedding_table(call: relax.Call) -> np.ndarray | None:
    """The float32 table of an embedding lookup ``take(const [rows, dim], ids, axis=0)``, else None."""
    table = _const_value(call.args[0])
    axis = call.attrs.axis
    if (table is None or table.ndim != 2 or table.dtype != np.float32 or axis is None or int(axis) != 0
            or _const_value(call.args[1]) is not None):
        return None
    return table


def _bias_of(call: relax.Call, producer: relax.Var) -> np.ndarray | None:
    """The constant of ``add(producer, const)`` (either order), or None."""
    if _op_name(call) != "relax.add":
        return None
    a, b = call.args
    if a.same_as(producer):
        return _const_value(b)
    if b.same_as(producer):
        return _const_value(a)
    return None


def _bias_vector(bias: np.ndarray, kind: str, channels: int) -> np.ndarray | None:
    """Squeeze a broadcast bias to one value per output channel, or None if it is not one."""
    want = {"dense": (channels,), "conv2d": (1, channels, 1, 1), "depthwise_conv2d": (1, channels, 1, 1)}[kind]
    if bias.size != channels:
        return None
    if kind == "dense" and bias.shape not in (want, (1, channels)):
        return None
    if kind != "dense" and bias.shape not in (want, (channels, 1, 1)):
        return None
    return bias.reshape(channels).astype(np.float32)


def analyze(mod: tvm.IRModule) -> Graph:
    """Build the op graph of ``mod["main"]`` (a prepared module: one dataflow block)."""
    func = mod["main"]
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        raise QuantizeError("main has no binding blocks; run hago.prepare first")
    stats = bn_stats(mod)
    bindings = [b for blk in body.blocks for b in blk.bindings]
    use_count: dict = {}
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            use_count[v] = use_count.get(v, 0) + 1
    for v in relax.analysis.free_vars(body.body):
        use_count[v] = use_count.get(v, 0) + 1

    var_edge: dict = {p: f"input:{p.name}" for p in func.params}
    edge_var = {f"input:{p.name}": p for p in func.params}
    nodes: list[Node] = []
    fused: set = set()
    value_of = {b.var: b.value for b in bindings}
    consumers_of_var: dict = {}
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            consumers_of_var.setdefault(v, []).append(b.var)

    for b in bindings:
        if b.var in fused or not isinstance(b.value, relax.Call):
            continue
        kind, weight = _classify(b.value)
        name = f"n{len(nodes)}_{kind}"
        node = Node(name, kind, b.value, b.var, b.var, weight=weight, relax_op=_op_name(b.value))
        if stats and node.weighted:
            node.bn_stats = stats.get(weight_key(weight))
        if node.weighted and use_count.get(b.var, 0) == 1 and b.var in consumers_of_var:
            # (no consumer binding: the layer's output is the function's output, so it has no bias add)
            nxt = consumers_of_var[b.var][0]
            val = value_of.get(nxt)
            if isinstance(val, relax.Call):
                bias = _bias_of(val, b.var)
                channels = weight.shape[0] if kind != "dense" else weight.shape[1]
                vec = _bias_vector(bias, kind, channels) if bias is not None else None
                if vec is not None:
                    node.bias, node.out_var = vec, nxt
                    fused.add(nxt)
        for v in relax.analysis.free_vars(b.value):
            if v in var_edge:
                node.inputs.append(var_edge[v])
        var_edge[node.out_var] = name
        edge_var[name] = node.out_var
        nodes.append(node)

    consumers: dict[str, list[str]] = {e: [] for e in edge_var}
    for n in nodes:
        for e in n.inputs:
            consumers[e].append(n.name)
    outputs = [var_edge[v] for v in relax.analysis.free_vars(body.body) if v in var_edge]
    # a non-call binding (tuple, alias) that forwards a node's value to the output
    for b in bindings:
        if not isinstance(b.value, relax.Call) and b.var in relax.analysis.free_vars(body.body):
            outputs += [var_edge[v] for v in relax.analysis.free_vars(b.value) if v in var_edge]
    return Graph(func, nodes, list(func.params), consumers, sorted(set(outputs)), edge_var, fused, mod)


def graph_hash(mod: tvm.IRModule) -> str:
    """Structural hash of the FP32 main (weights included): the key a strategy is valid for."""
    return format(tvm_ffi.structural_hash(mod["main"], map_free_vars=True) & (2**64 - 1), "016x")
