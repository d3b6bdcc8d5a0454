"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", sec. 4.1).

Two weighted layers joined by a positively homogeneous function ``f``
(``f(x / s) = f(x) / s`` for ``s > 0``) compute the same thing when output
channel ``i`` of the first is divided by ``s_i`` (its weights and its bias)
and input channel ``i`` of the second multiplied by ``s_i``. With ``r1_i``
the range (max ``|w|``) of the first layer's output channel ``i`` and
``r2_i`` that of the second layer's input channel ``i``,

    s_i = sqrt(r1_i * r2_i) / r2_i

makes both ranges ``sqrt(r1_i * r2_i)``: a channel whose weights were tiny
next to its layer's largest (depthwise convs after batch-norm folding, the
MobileNet case) no longer rounds to a few levels under per-tensor weight
scales, and per-channel scales of the *second* layer's rows get balanced
too. Layers in chains share channels with two pairs, so the pairs are swept
until no scale moves by more than ``tol`` (``max_sweeps`` at most).

What is equalized (the FP32 function is unchanged up to float rounding):

* ``conv2d`` (any groups, as the first layer), ``depthwise_conv2d`` and
  ``dense`` pairs, the second layer an ungrouped conv, a depthwise conv or a
  dense; conv -> depthwise, depthwise -> pointwise (the main use case: the
  depthwise weights of MobileNets/EfficientNets), conv -> conv, dense -> dense;
* through any number of ``relu``, ``max_pool2d``, ``avg_pool2d`` and
  ``global_avg_pool2d`` (all positively homogeneous per channel), and one
  flatten/reshape from ``[N, C, ...]`` to ``[N, C*k]`` before a dense (input
  rows ``i*k .. i*k + k - 1`` scale with channel ``i``); directly joined
  layers (no activation) too.

What is not:

* ``clip`` (ReLU6): clipping breaks positive homogeneity
  (``clip(x / s, 0, 6) != clip(x, 0, 6) / s`` once ``x > 6 min(1, s)``); the
  paper replaces ReLU6 by ReLU before equalizing, which changes the FP32
  network, and hago keeps the FP32 network as given. Such pairs are counted
  in the report (``skipped_clip``);
* a first layer whose output has other consumers or leaves the function, and
  any other op in between (add, concat, sigmoid ...); a grouped
  (non-depthwise) second conv is counted as ``skipped_other``;
* the paper's high-bias absorption is not done.

Runs on the prepared FP32 module before annotate and calibration (a
:class:`~hago.correct.base.GraphCorrection`), since it changes weights and the
activation ranges in between; folded batch-norm statistics kept on the module
(:func:`hago.graph.bn_stats`) follow the first layer's scaling (mean and std
divided by ``s``), so ``bias_data_free`` can run after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from hago.correct.base import GraphCorrection, register
from hago.graph import Graph, Node, analyze, bn_stats, weight_key, with_bn_stats, with_main

log = logging.getLogger(__name__)

_RESHAPES = ("relax.reshape", "relax.flatten", "relax.squeeze")
_POOLS = ("max_pool2d", "avg_pool2d", "global_avg_pool2d")


@dataclass
class Pair:
    """``first`` -> (positively homogeneous ops) -> ``second``; ``repeat`` input rows of a dense per channel."""

    first: Node
    second: Node
    repeat: int = 1


def static_shape(var) -> list[int] | None:
    shape = getattr(var.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        return None
    return [int(d.value) if isinstance(d, tvm.tirx.IntImm) else -1 for d in values]


def _channels(node: Node) -> int:
    return node.weight.shape[1] if node.kind == "dense" else node.weight.shape[0]


def _second_fits(node: Node, channels: int, repeat: int, layout: str) -> bool:
    w = node.weight
    if node.kind == "dense":
        return layout in ("flat", "last") and w.shape[0] == channels * repeat
    if layout != "nchw":
        return False
    if node.kind == "depthwise_conv2d":
        return w.shape[0] == channels
    return int(node.call.attrs.groups) == 1 and w.shape[1] == channels


def find_pairs(graph: Graph) -> tuple[list[Pair], dict[str, int]]:
    """The equalizable pairs of ``graph`` and the layers left out: ``skipped_clip`` (output through a clip,
    i.e. ReLU6) and ``skipped_other`` (a weighted layer follows that does not fit, e.g. a grouped conv)."""
    pairs, skipped = [], {"skipped_clip": 0, "skipped_other": 0}
    users: dict = {}
    for n in graph.nodes:
        if n.weighted:
            users.setdefault(n.call.args[1], []).append(n.name)
    shared = {name for names in users.values() if len(names) > 1 for name in names}
    for first in graph.nodes:
        if not first.weighted or first.name in shared:
            continue
        channels = _channels(first)
        layout = "last" if first.kind == "dense" else "nchw"
        edge, repeat, why = first.name, 1, None
        while True:
            cons = graph.consumers.get(edge, [])
            if edge in graph.outputs or len(cons) != 1:
                break  # fan-out or an output: no pair
            n = graph.node(cons[0])
            if n.weighted:
                if n.name not in shared and n.inputs == [edge] and _second_fits(n, channels, repeat, layout):
                    pairs.append(Pair(first, n, repeat))
                else:
                    why = "other"
                break
            if n.kind == "clip":
                why = "clip"
                break
            if n.kind == "reshape" and n.relax_op in _RESHAPES and layout == "nchw":
                src, dst = static_shape(graph.edge_var[edge]), static_shape(n.out_var)
                if (src is None or dst is None or len(dst) != 2 or len(src) < 2 or src[1] != channels
                        or min(src[1:]) < 1 or dst[1] != int(np.prod(src[1:]))):
                    break
                repeat, layout = dst[1] // channels, "flat"
            elif not (n.kind == "relu" or (n.kind in _POOLS and layout == "nchw")):
                break  # add, concat, sigmoid ...: not positively homogeneous per channel, or not per channel
            edge = n.name
        if why is not None:
            skipped[f"skipped_{why}"] += 1
    return pairs, skipped


# -- per-channel ranges and scaling of the two sides ----------------------------------
def out_ranges(node: Node, w: np.ndarray) -> np.ndarray:
    """max |w| per output channel (dense ``[K, N]``: per column)."""
    return np.abs(w).max(axis=0) if node.kind == "dense" else np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def in_ranges(node: Node, w: np.ndarray, channels: int, repeat: int = 1) -> np.ndarray:
    """max |w| per input channel of the second layer (a dense's ``repeat`` rows per channel together)."""
    if node.kind == "dense":
        return np.abs(w).reshape(channels, -1).max(axis=1)
    if node.kind == "depthwise_conv2d":
        return np.abs(w).reshape(channels, -1).max(axis=1)
    return np.abs(w).transpose(1, 0, 2, 3).reshape(channels, -1).max(axis=1)


def _scale_out(node: Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    return w / s[None, :] if node.kind == "dense" else w / s.reshape(-1, 1, 1, 1)


def _scale_in(node: Node, w: np.ndarray, s: np.ndarray, repeat: int) -> np.ndarray:
    if node.kind == "dense":
        return w * np.repeat(s, repeat)[:, None]
    if node.kind == "depthwise_conv2d":
        return w * s.reshape(-1, 1, 1, 1)
    return w * s.reshape(1, -1, 1, 1)


def equalize(pairs: list[Pair], weights: dict, biases: dict, stats: dict, *, tol: float = 1e-6,
             max_sweeps: int = 100) -> int:
    """Sweep ``pairs`` until no scale moves more than ``tol``; updates the float64 arrays in place. Sweeps run."""
    for sweep in range(1, max_sweeps + 1):
        moved = 0.0
        for p in pairs:
            a, b = p.first.name, p.second.name
            c = _channels(p.first)
            r1, r2 = out_ranges(p.first, weights[a]), in_ranges(p.second, weights[b], c, p.repeat)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones(c)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            weights[a] = _scale_out(p.first, weights[a], s)
            if biases.get(a) is not None:
                biases[a] = biases[a] / s
            if stats.get(a) is not None:
                stats[a] = (stats[a][0] / s, stats[a][1] / s)
            weights[b] = _scale_in(p.second, weights[b], s, p.repeat)
            moved = max(moved, float(np.abs(s - 1).max(initial=0.0)))
        if moved < tol:
            return sweep
    log.info("cross-layer equalization: scales still moved by %.2g after %d sweeps", moved, max_sweeps)
    return max_sweeps


@mutator
class _SwapConstants(PyExprMutator):
    def __init__(self, swaps: dict, mod: tvm.IRModule):
        super().__init__(mod)
        self.swaps = swaps

    def visit_generic_const_(self, op):
        return self.swaps.get(op, op)


def _bias_const(graph: Graph, node: Node):
    """The constant of the node's fused bias add, or None."""
    if node.bias is None:
        return None
    for blk in graph.func.body.blocks:
        for b in blk.bindings:
            if b.var.same_as(node.out_var):
                a0, a1 = b.value.args
                return a1 if isinstance(a1, tvm.ir.expr.Constant) else a0
    return None


@register("cle")
class CrossLayerEqualization(GraphCorrection):
    """Cross-layer equalization of conv/dense pairs through ReLU (not ReLU6) on the FP32 weights, before calibration."""

    def __init__(self, tol: float = 1e-6, max_sweeps: int = 100):
        self.tol, self.max_sweeps = tol, max_sweeps

    def rewrite(self, mod: tvm.IRModule) -> tuple[tvm.IRModule, dict]:
        graph = analyze(mod)
        pairs, skipped = find_pairs(graph)
        if not pairs:
            return mod, {"pairs": 0, **skipped}
        nodes = {n.name: n for p in pairs for n in (p.first, p.second)}
        weights = {k: n.weight.astype(np.float64) for k, n in nodes.items()}
        biases = {k: (None if n.bias is None else n.bias.astype(np.float64)) for k, n in nodes.items()}
        stats = {k: n.bn_stats for k, n in nodes.items()}
        before = _imbalance(pairs, weights)
        sweeps = equalize(pairs, weights, biases, stats, tol=self.tol, max_sweeps=self.max_sweeps)
        swaps, kept = {}, bn_stats(mod)
        for k, n in nodes.items():
            w = weights[k].astype(n.weight.dtype)
            swaps[n.call.args[1]] = relax.const(w)
            if n.bn_stats is not None:
                kept.pop(weight_key(n.weight), None)
                kept[weight_key(w)] = stats[k]
            const = _bias_const(graph, n)
            if const is not None and biases[k] is not None:
                old = const.value.numpy()
                swaps[const] = relax.const(biases[k].reshape(old.shape).astype(old.dtype))
        main = _SwapConstants(swaps, mod).visit_expr(mod["main"])
        out = with_main(mod, main)
        if kept or bn_stats(mod):
            out = with_bn_stats(out, kept)
        report = {"pairs": len(pairs), "sweeps": sweeps, "range_ratio_before": before,
                  "range_ratio_after": _imbalance(pairs, weights), **skipped}
        return out, report


def _imbalance(pairs: list[Pair], weights: dict) -> float:
    """Mean over pairs of the mean per-channel ``max(r1, r2) / min(r1, r2)`` (1.0: equalized)."""
    vals = []
    for p in pairs:
        c = _channels(p.first)
        r1 = out_ranges(p.first, weights[p.first.name])
        r2 = in_ranges(p.second, weights[p.second.name], c, p.repeat)
        ok = (r1 > 0) & (r2 > 0)
        if ok.any():
            vals.append(float(np.mean(np.maximum(r1[ok], r2[ok]) / np.minimum(r1[ok], r2[ok]))))
    return round(float(np.mean(vals)), 4) if vals else 1.0
