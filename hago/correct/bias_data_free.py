"""Data-free bias correction (Nagel et al. 2019, "Data-Free Quantization", sec. 4.2, analytic form).

Rounding a layer's weights ``W`` to ``W_q`` moves its expected output, per
output channel, by ``E[W_q x] - E[W x] = (W_q - W) E[x]``. The empirical
correction (:mod:`hago.correct.bias`) measures ``E[x]`` on calibration data;
this one computes it from the batch norm that produced ``x``, without data:

* the batch norm folded into the producing layer (kept at prepare,
  :func:`hago.prepare.fold_batch_norm`; ``Node.bn_stats``) says its output
  channel ``c`` is ``N(mu_c, sigma_c^2)`` with ``mu = beta``,
  ``sigma = |gamma|`` (the BN's running statistics assumed to be those of
  its input);
* through ``relu`` (``clip(x, a, b)``: ReLU6) the mean of a clipped normal:
  ``E[clip(z, a, b)] = a Phi(alpha) + b (1 - Phi(beta)) + mu (Phi(beta) -
  Phi(alpha)) + sigma (phi(alpha) - phi(beta))`` with ``alpha = (a - mu) /
  sigma``, ``beta = (b - mu) / sigma`` (ReLU: ``a = 0, b = inf``, i.e.
  ``mu Phi(mu/sigma) + sigma phi(mu/sigma)``); no activation: ``mu``;
* ``avg_pool2d`` / ``global_avg_pool2d`` keep the mean (border padding
  ignored, as in the paper), a flatten repeats it over each channel's rows.

Each integer conv/dense layer whose input comes, through those ops only, from
a layer with batch-norm statistics gets ``bias_delta -= (W_q - W) E[x]``,
with ``W_q`` the weight realize will use (its bits, its per-channel scale;
after ``adaround``'s rounding when that ran before). Layers fed by a max pool,
an add (residual), a concat or the graph input are left alone (their input
mean is not a clipped normal); the report counts them. Only the weights'
rounding error is corrected: the input's quantization error needs data.
A model without folded batch norms (or an ONNX file whose Conv+BatchNorm
ONNX Runtime already fused at import) has no statistics: the correction
says so in one line and does nothing.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from hago.correct.base import Correction, CorrectionContext, corrected_graph, register
from hago.correct.cle import static_shape
from hago.graph import Graph, Node
from hago.realize.quant import fake_quantized_weight

log = logging.getLogger(__name__)

_MEAN_KEEPING = ("avg_pool2d", "global_avg_pool2d")


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def clipped_normal_mean(mu: np.ndarray, sigma: np.ndarray, lo: float = 0.0, hi: float = math.inf) -> np.ndarray:
    """``E[clip(z, lo, hi)]`` for ``z ~ N(mu, sigma^2)``, elementwise (``sigma == 0``: ``clip(mu, lo, hi)``)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    safe = np.where(sigma > 0, sigma, 1.0)

    def side(bound: float):  # (Phi, phi, bound * Phi) at the standardized bound; the limits at +-inf
        if math.isinf(bound):
            return (np.zeros_like(mu) if bound < 0 else np.ones_like(mu)), np.zeros_like(mu), 0.0
        t = (bound - mu) / safe
        return _Phi(t), _phi(t), bound

    pa, da, a = side(lo)
    pb, db, b = side(hi)
    mean = a * pa + b * (1.0 - pb) + mu * (pb - pa) + sigma * (da - db)
    return np.where(sigma > 0, mean, np.clip(mu, lo, hi))


def _clip_bounds(node: Node) -> tuple[float, float]:
    return tuple(float(v.value) for v in node.call.args[1:3])


def expected_input(graph: Graph, node: Node) -> tuple[np.ndarray | None, str]:
    """``(E[x] per input channel of node, "")`` from batch-norm statistics, or ``(None, why not)``."""
    ops, edge = [], node.inputs[0]
    while True:
        p = graph.producer(edge)
        if p is None:
            return None, "graph input"
        if p.weighted:
            break
        if p.kind in ("relu", "clip", "reshape", *_MEAN_KEEPING):
            ops.append(p)
            edge = p.inputs[0]
            continue
        return None, p.kind
    if p.bn_stats is None:
        return None, "no batch norm"
    mu, sigma = (np.asarray(a, np.float64) for a in p.bn_stats)
    mean, normal = mu, True  # while ``normal``, the tensor is still N(mu, sigma^2) per channel
    for op in reversed(ops):
        if op.kind in ("relu", "clip"):
            lo, hi = (0.0, math.inf) if op.kind == "relu" else _clip_bounds(op)
            if normal:
                mean, normal = clipped_normal_mean(mu, sigma, lo, hi), False
            elif not (op.kind == "relu" or (lo <= 0.0 and hi == math.inf)):
                return None, "two activations"  # a relu after a relu is the identity; anything else is not
        elif op.kind == "reshape":
            k = _flatten_repeat(graph, op, len(mean))
            if k is None:
                return None, "reshape"
            mean, mu, sigma = (np.repeat(a, k) for a in (mean, mu, sigma))
    return mean, ""


def _flatten_repeat(graph: Graph, op: Node, channels_in: int) -> int | None:
    """Rows per channel of a ``[N, C, ...] -> [N, C*k]`` flatten (1 for ``[N, C, 1, 1] -> [N, C]``), else None."""
    src, dst = static_shape(graph.edge_var[op.inputs[0]]), static_shape(op.out_var)
    if (src is None or dst is None or len(src) < 2 or len(dst) != 2 or src[1] != channels_in
            or min(src[1:]) < 1 or dst[1] != int(np.prod(src[1:]))):
        return None
    return dst[1] // channels_in


def output_shift(node: Node, dw: np.ndarray, ex: np.ndarray) -> np.ndarray | None:
    """``(W_q - W) E[x]`` per output channel (None when ``E[x]`` does not fit the layer's input)."""
    if node.kind == "dense":
        return ex @ dw if dw.shape[0] == ex.size else None
    groups = int(node.call.attrs.groups)
    out_ch, per_group = dw.shape[:2]
    if per_group * groups != ex.size:
        return None
    summed = dw.reshape(out_ch, per_group, -1).sum(axis=2)
    group_of = np.arange(out_ch) // (out_ch // groups)
    return np.einsum("oi,oi->o", summed, ex.reshape(groups, per_group)[group_of])


@register("bias_data_free")
class DataFreeBiasCorrection(Correction):
    """Subtract each integer layer's expected output shift (W_q - W) E[x], E[x] from batch-norm statistics (no data)."""

    local = True  # a layer's delta depends only on its own weight bits (and, via the scale floor, its input edge)

    def run(self, ctx: CorrectionContext) -> dict:
        g, s = ctx.graph, ctx.strategy
        if not any(n.bn_stats is not None for n in g.nodes):
            msg = "the model has no batch-norm statistics (no BatchNorm folded at prepare): nothing corrected"
            log.warning("bias_data_free: %s", msg)
            return {"layers": 0, "note": msg}
        base = corrected_graph(g, s)  # earlier corrections (adaround's rounding) stay in
        done, skipped, rel = 0, {}, []
        for node in base.nodes:
            op = s.ops.get(node.name)
            if not node.weighted or op is None or op.mode != "integer":
                continue
            ex, why = expected_input(base, node)
            if ex is None:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            edge = s.resolved(node.inputs[0])
            in_scale = None
            if edge.qparams is not None and np.asarray(edge.qparams.scale).size == 1 and not edge.dynamic:
                in_scale = float(np.asarray(edge.qparams.scale).ravel()[0])
            w = node.weight.astype(np.float64)
            dw = fake_quantized_weight(node, op.weight_bits, in_scale, op.weight_scale).astype(np.float64) - w
            shift = output_shift(node, dw, ex)
            if shift is None:
                skipped["shape"] = skipped.get("shape", 0) + 1
                continue
            prev = np.asarray(op.bias_delta, np.float64) if op.bias_delta is not None else 0.0
            op.bias_delta = [float(v) for v in (prev - shift).astype(np.float32)]
            done += 1
            rel.append(float(np.abs(shift).mean()))
        report = {"layers": done, "mean_abs_shift": round(float(np.mean(rel)), 6) if rel else 0.0}
        if skipped:
            report["skipped"] = skipped
        return report
