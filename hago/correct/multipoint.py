"""The ``multipoint`` correction: extra low-bit points for the output channels that need them most.

Runs the method of :mod:`hago.multipoint` (Liu et al. 2020, arXiv 2002.09049)
on every integer dense and one-group NCHW conv2d layer: point 1 is what realize bakes for the layer (the corrected graph's
weight, the bias floor at the calibrated input scale, so ``adaround``'s learned
rounding before it stays point 1), the residual is taken against the FP32
weight, and the layer's FP32 input on the calibration samples (one probe pass)
gives the Gram matrix that measures each channel's output error. The points
go into ``OpChoice.multipoint`` (JSON: source channels, coefficients, packed
codes), so ``realize``, ``simulate`` and a replayed ``strategy.json`` rebuild
the same program without running it again.

A dense with a dynamic (per-row) input takes points too (no bias floor
there: its input scale is only known at run time); depthwise convs do not
(a channel is its own group). Order: after ``adaround`` / ``brecq`` / ``dfmpc``
(the points approximate what *their* point 1 leaves over; a rounding learned
afterwards would leave stale points) and before ``bias``
(``adaround,multipoint,bias``), so the bias correction measures the layers
with their extra points.

Not ``local`` for the search: the search copies only ``bias_delta`` and
``weight_round`` between candidates, so it refuses this plug-in (pricing extra
channels as a candidate is future work).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from hago import multipoint as mp
from hago.correct.adaround import fp32_edges
from hago.correct.base import Correction, CorrectionContext, corrected_graph, register
from hago.realize.quant import quantize_layer_weight

log = logging.getLogger(__name__)


def _input_scale(strategy, node) -> float | None:
    """The calibrated input scale realize floors the weight scale with; None for a dynamic input (no floor)."""
    qp = strategy.resolved(node.inputs[0]).qparams
    return float(qp.scale) if qp is not None else None


@register("multipoint")
class Multipoint(Correction):
    """Give each selected layer ``budget`` x its output channels extra points (at least one), greedily.

    ``budget``: extra output channels per layer as a fraction of its channels
    (the overhead in multiply-adds). ``max_points``: points per channel at
    most. ``max_samples``: calibration samples whose layer inputs form the
    Gram matrices (``0``: no data, the weight error decides). The report gives,
    summed over the layers, the output error with one point and with the
    extra ones, and the extra channels as a fraction of all.
    """

    def __init__(self, budget: float = 0.1, max_points: int = 4, max_samples: int = 32, channel_block: int = 1,
                 layers=None):
        if not 0 <= budget <= 1:
            raise ValueError(f"multipoint budget {budget}: a fraction of the output channels in [0, 1]")
        self.budget, self.max_points, self.max_samples = budget, max_points, max_samples
        #: only these layer names (None: every layer that takes points); the search fits its ``4+`` layers only
        self.layers = None if layers is None else frozenset(layers)
        #: the kernel pads output channels to a multiple of this (``Backend.output_channel_block``): a layer's
        #: extra channels are rounded up to fill the last block, whose lanes are paid for anyway
        self.channel_block = channel_block

    def extra_count(self, out_channels: int) -> int:
        """Extra channels for a layer of ``out_channels``: the budget's, rounded up to fill the kernel's block."""
        extra = mp.extra_count(out_channels, self.budget)
        if extra and self.channel_block > 1:
            extra = -(-(out_channels + extra) // self.channel_block) * self.channel_block - out_channels
        return extra

    def selected(self, ctx: CorrectionContext) -> list:
        out = []
        for node in ctx.graph.nodes:
            op = ctx.strategy.ops.get(node.name)
            if op is None or op.mode != "integer" or node.kind not in ("dense", "conv2d"):
                continue
            if self.layers is not None and node.name not in self.layers:
                continue
            if node.kind == "conv2d":
                a = node.call.attrs
                if int(a.groups) != 1 or str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
                    continue
            src = ctx.strategy.resolved(node.inputs[0])
            if src.qparams is None and not (src.dynamic and node.kind == "dense"):
                continue
            out.append(node)
        return out

    def run(self, ctx: CorrectionContext) -> dict:
        nodes = self.selected(ctx)
        if not nodes or self.budget == 0:
            return {"layers": 0}
        t0 = time.perf_counter()
        base = corrected_graph(ctx.graph, ctx.strategy)  # point 1 is what realize will bake
        inputs = (fp32_edges(ctx, sorted({n.inputs[0] for n in nodes}), self.max_samples, "multipoint probe")
                  if self.max_samples and ctx.samples is not None and len(ctx.samples) else {})
        err1 = errn = 0.0
        extra = channels = 0
        for node in nodes:
            op = ctx.strategy.ops[node.name]
            quantized = base.node(node.name)
            # the target: dfmpc's scaled weight where it ran, the FP32 one under a learned rounding
            target = node if op.weight_round is not None else quantized
            points, rep = self.layer(quantized, target, op.weight_bits, _input_scale(ctx.strategy, node),
                                     inputs.get(node.inputs[0]))
            op.multipoint = points.to_json() if len(points) else None  # (a second run replaces the first)
            err1, errn = err1 + rep["error_1"], errn + rep["error_n"]
            extra += len(points)
            channels += mp.to_rows(node.weight, node.kind).shape[0]
            log.debug("multipoint %s: %d extra points, output error x%.3f", node.name, len(points),
                      rep["error_n"] / max(rep["error_1"], 1e-30))
        return {"layers": len(nodes), "extra_channels": extra, "overhead": round(extra / max(channels, 1), 4),
                "error_ratio": round(errn / max(err1, 1e-30), 4), "seconds": round(time.perf_counter() - t0, 1)}

    def layer(self, quantized_node, target_node, bits: int, sx: float | None, x: np.ndarray | None):
        """``(ExtraPoints, report)`` for one layer: ``quantized_node`` gives point 1, ``target_node`` the weight
        the points approximate, ``x`` its FP32 input (None: the weight error decides)."""
        wq, wqp = quantize_layer_weight(quantized_node, bits, sx)
        kind = target_node.kind
        q1, w = mp.to_rows(wq, kind), mp.to_rows(target_node.weight, kind)
        g = None if x is None else input_gram(target_node, x)
        return mp.build_points(w, q1, wqp.scale, g, bits, self.extra_count(len(w)), self.max_points)


def input_gram(node, x: np.ndarray) -> np.ndarray:
    """The Gram matrix of a dense or conv layer's input rows (:func:`hago.multipoint.gram`)."""
    if node.kind == "dense":
        return mp.gram(mp.dense_rows(x))
    a = node.call.attrs
    kh, kw = (int(d) for d in node.weight.shape[2:])
    return mp.conv_gram(x, (kh, kw), tuple(int(s) for s in a.strides), tuple(int(p) for p in a.padding),
                        tuple(int(d) for d in a.dilation))
