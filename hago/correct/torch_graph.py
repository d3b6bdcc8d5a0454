"""Run nodes of hago's :class:`~hago.graph.Graph` in PyTorch, for the corrections that need gradients.

Block reconstruction (:mod:`hago.correct.brecq`) learns through a block's
forward pass, and its Fisher loss needs the gradient of the network's output
with respect to a block's output: both need the FP32 graph as differentiable
code. The graph is a prepared Relax ``main``, so each node's call is mapped to
the PyTorch function that computes the same thing, by Relax op name
(:data:`OPS`). The weighted layers take their weight as an argument (the soft
or hard quantized weight being learned) and add their fused bias.

An op without an entry here is refused in one line (:class:`QuantizeError`
naming the op), before any learning; one whose attributes have no form here
(a conv not in NCHW, a layer norm over other than the last axes) or whose
PyTorch call fails (a reshape written for a fixed batch) is refused in one line
naming the node when it runs. BRECQ leaves such a block at round to nearest and
says so; its Fisher loss refuses such a model.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax

from hago.correct.base import channels
from hago.errors import QuantizeError
from hago.graph import Graph, Node


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _axes(attr, ndim: int) -> list[int] | None:
    return None if attr is None else [int(a) % ndim for a in attr]


def _reduce(fn_name: str):
    def run(torch, call, x):
        axes = _axes(call.attrs.axis, x.dim())
        if axes == []:  # Relax reduces nothing over no axes; torch would reduce them all
            return x
        keep = bool(call.attrs.keepdims)
        return getattr(torch, fn_name)(x, dim=list(range(x.dim())) if axes is None else axes, keepdim=keep)
    return run


def _pool(kind: str):
    def run(torch, call, x):
        a = call.attrs
        if str(a.layout) != "NCHW":
            raise QuantizeError(f"{kind} pool in layout {a.layout} has no PyTorch form here (NCHW only)")
        top, left, bottom, right = _ints(a.padding)
        F = torch.nn.functional
        k, s, d = tuple(_ints(a.pool_size)), tuple(_ints(a.strides)), tuple(_ints(a.dilation))
        if kind == "max":
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
            return F.max_pool2d(x, k, s, dilation=d, ceil_mode=bool(a.ceil_mode))
        if (top, left) != (bottom, right) or d != (1, 1):
            raise QuantizeError("avg_pool2d with asymmetric padding or dilation has no PyTorch form here")
        return F.avg_pool2d(x, k, s, padding=(top, left), ceil_mode=bool(a.ceil_mode),
                            count_include_pad=bool(a.count_include_pad))
    return run


def _reshape(torch, call, x, shape):
    dims = [d if isinstance(d, int) else -1 for d in shape]
    return x.reshape(dims)


def _layer_norm(torch, call, x, gamma, beta):
    a = call.attrs
    axes = _axes(a.axes, x.dim())
    if axes != list(range(x.dim() - len(axes), x.dim())):
        raise QuantizeError(f"layer_norm over axes {axes} (not the last ones) has no PyTorch form here")
    shape = x.shape[-len(axes):]
    return torch.nn.functional.layer_norm(x, shape, gamma if a.scale else None, beta if a.center else None,
                                          float(a.epsilon))


def _strided_slice(torch, call, x, axes, begin, end, strides=None):
    index = [slice(None)] * x.dim()
    strides = strides or [1] * len(axes)
    for ax, b, e, s in zip(axes, begin, end, strides):
        index[int(ax) % x.dim()] = slice(int(b), int(e), int(s))
    return x[tuple(index)]


def _adaptive_avg(torch, call, x):
    a = call.attrs
    size = _ints(a.output_size) if a.output_size is not None else list(x.shape[2:])  # None: the input's size
    if str(a.layout) != "NCHW":
        raise QuantizeError(f"adaptive_avg_pool2d in layout {a.layout} has no PyTorch form here")
    return torch.nn.functional.adaptive_avg_pool2d(x, size * (2 // len(size)))


def _conv(torch, call, x, w):
    a = call.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
        raise QuantizeError(f"conv2d in layout {a.data_layout}/{a.kernel_layout} has no PyTorch form here")
    top, left, bottom, right = _ints(a.padding)
    F = torch.nn.functional
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride=tuple(_ints(a.strides)),
                    dilation=tuple(_ints(a.dilation)), groups=int(a.groups))


def _expanded(shape, axis) -> list[int]:
    out = list(shape)
    ndim = len(out) + len(axis)
    for a in sorted(int(a) % ndim for a in axis):
        out.insert(a, 1)
    return out


def _prelu(torch, call, x, alpha):
    shape = [1] * x.dim()
    shape[int(call.attrs.axis) % x.dim()] = -1
    return torch.where(x >= 0, x, x * alpha.reshape(shape))


def _take(torch, call, table, ids):
    if call.attrs.axis is None or int(call.attrs.axis) != 0:
        raise QuantizeError("take along an axis other than 0 has no PyTorch form here")
    return torch.index_select(table, 0, ids.reshape(-1).long()).reshape(*ids.shape, *table.shape[1:])


#: Relax op name -> ``f(torch, call, *args)`` with the call's arguments evaluated (tensors, lists, numbers)
OPS: dict[str, Callable] = {
    "relax.nn.conv2d": _conv,
    "relax.matmul": lambda torch, call, a, b: torch.matmul(a, b),
    "relax.add": lambda torch, call, a, b: a + b,
    "relax.subtract": lambda torch, call, a, b: a - b,
    "relax.multiply": lambda torch, call, a, b: a * b,
    "relax.divide": lambda torch, call, a, b: a / b,
    "relax.power": lambda torch, call, a, b: torch.pow(a, b),
    "relax.maximum": lambda torch, call, a, b: torch.maximum(a, torch.as_tensor(b, dtype=a.dtype)),
    "relax.minimum": lambda torch, call, a, b: torch.minimum(a, torch.as_tensor(b, dtype=a.dtype)),
    "relax.less": lambda torch, call, a, b: torch.as_tensor(a) < b,
    "relax.greater": lambda torch, call, a, b: torch.as_tensor(a) > b,
    "relax.equal": lambda torch, call, a, b: torch.as_tensor(a) == b,
    "relax.where": lambda torch, call, c, a, b: torch.where(c, a, b),
    "relax.nn.relu": lambda torch, call, x: torch.relu(x),
    "relax.nn.leakyrelu": lambda torch, call, x: torch.nn.functional.leaky_relu(x, float(call.attrs.alpha)),
    "relax.nn.prelu": _prelu,
    "relax.clip": lambda torch, call, x, lo, hi: x.clamp(float(lo), float(hi)),
    "relax.sigmoid": lambda torch, call, x: torch.sigmoid(x),
    "relax.tanh": lambda torch, call, x: torch.tanh(x),
    "relax.exp": lambda torch, call, x: torch.exp(x),
    "relax.sqrt": lambda torch, call, x: torch.sqrt(x),
    "relax.rsqrt": lambda torch, call, x: torch.rsqrt(x),
    "relax.erf": lambda torch, call, x: torch.erf(x),
    "relax.negative": lambda torch, call, x: -x,
    "relax.nn.silu": lambda torch, call, x: torch.nn.functional.silu(x),
    "relax.nn.gelu": lambda torch, call, x: torch.nn.functional.gelu(x),
    "relax.nn.gelu_tanh": lambda torch, call, x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relax.nn.softmax": lambda torch, call, x: torch.softmax(x, int(call.attrs.axis)),
    "relax.nn.log_softmax": lambda torch, call, x: torch.log_softmax(x, int(call.attrs.axis)),
    "relax.nn.layer_norm": _layer_norm,
    "relax.mean": _reduce("mean"),
    "relax.sum": _reduce("sum"),
    "relax.max": _reduce("amax"),
    "relax.min": _reduce("amin"),
    "relax.reshape": _reshape,
    "relax.permute_dims": lambda torch, call, x: x.permute(
        *(_axes(call.attrs.axes, x.dim()) or list(reversed(range(x.dim()))))),
    "relax.flatten": lambda torch, call, x: x.reshape(-1),
    "relax.squeeze": lambda torch, call, x: (x.squeeze() if call.attrs.axis is None
                                             else x.squeeze(tuple(_axes(call.attrs.axis, x.dim())))),
    "relax.expand_dims": lambda torch, call, x: x.reshape(_expanded(x.shape, call.attrs.axis)),
    "relax.broadcast_to": lambda torch, call, x, shape: x.expand(*[d if isinstance(d, int) else -1 for d in shape]),
    "relax.concat": lambda torch, call, xs: torch.cat(list(xs), int(call.attrs.axis)),
    "relax.strided_slice": _strided_slice,
    "relax.astype": lambda torch, call, x: x.to(getattr(torch, str(call.attrs.dtype))),
    "relax.take": _take,
    "relax.nn.max_pool2d": _pool("max"),
    "relax.nn.avg_pool2d": _pool("avg"),
    "relax.nn.adaptive_avg_pool2d": _adaptive_avg,
}


def supported(node: Node) -> bool:
    """Whether :class:`TorchGraph` can run ``node``."""
    return node.relax_op in OPS


class TorchGraph:
    """``run(env, weights)``: nodes of ``graph`` evaluated in PyTorch, in topological order.

    ``env`` maps edges to tensors (the graph inputs, or a block's input) and is
    filled with every node's output; ``weights`` overrides a weighted node's
    weight (else its FP32 weight). ``before(node, args)`` may replace the
    arguments a node reads and ``after(node, y)`` its output (fake
    quantization where the integer program rounds). Constants are turned into tensors once.
    """

    def __init__(self, torch, graph: Graph, nodes: list[Node] | None = None):
        self.torch, self.graph = torch, graph
        self.nodes = list(graph.nodes if nodes is None else nodes)
        missing = sorted({n.relax_op or n.kind for n in self.nodes if not supported(n)})
        if missing:
            raise QuantizeError(f"no PyTorch form for op(s) {', '.join(missing)}")
        self._const: dict = {}
        self.fp32_w = {n.name: torch.from_numpy(np.ascontiguousarray(n.weight, np.float32))
                       for n in self.nodes if n.weighted}
        self.bias = {n.name: torch.from_numpy(n.bias.reshape(_bias_shape(n))) for n in self.nodes
                     if n.weighted and n.bias is not None}

    def run(self, env: dict, weights: dict | None = None, before=None, after=None) -> dict:
        weights = weights or {}
        for n in self.nodes:
            args = [self._value(a, env) for a in n.call.args]
            if n.weighted:
                args[1] = weights.get(n.name, self.fp32_w[n.name])
            if before is not None:
                args = before(n, args)
            try:
                y = OPS[n.relax_op](self.torch, n.call, *args)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:  # e.g. a reshape for a fixed batch
                line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise QuantizeError(f"the PyTorch run of {n.name} ({n.relax_op}) failed: {line}") from None
            if n.name in self.bias:
                y = y + self.bias[n.name]
            env[n.name] = after(n, y) if after is not None else y
        return env

    def _value(self, expr, env):
        if isinstance(expr, relax.Var):
            edge = self.graph.edge_of(expr)
            if edge is None or edge not in env:
                raise QuantizeError(f"the PyTorch run has no value for {expr.name_hint!r}")
            return env[edge]
        if isinstance(expr, relax.Tuple):
            return [self._value(f, env) for f in expr.fields]
        if isinstance(expr, relax.ShapeExpr):
            return [int(v) if isinstance(v, tvm.tirx.IntImm) else v for v in expr.values]
        if isinstance(expr, tvm.ir.expr.Constant):  # a tensor constant, or a scalar (IntImm / FloatImm)
            value = expr.value
            if not hasattr(value, "numpy"):
                return value
            if expr not in self._const:  # keyed by the IR node (a wrapper's id() is reused once it is freed)
                self._const[expr] = self.torch.from_numpy(np.ascontiguousarray(value.numpy()))
            return self._const[expr]
        raise QuantizeError(f"the PyTorch run cannot read an argument of kind {type(expr).__name__}")


def _bias_shape(node: Node) -> tuple[int, ...]:
    return (channels(node),) if node.kind == "dense" else (1, channels(node), 1, 1)
