"""weight_clip: each output channel's weight step chosen by least Lp rounding error, not by its largest weight.

A max-abs step (:func:`hago.qparams.weight_qparams`) spends the grid on the
channel's one largest weight. At 4 bits that leaves 7 steps a side, and a
channel with one outlier rounds most of its other weights to 0 or 1 step. A
smaller step clips the outlier a little and resolves the rest; the best step
minimises the channel's total rounding error.

This is how the reference code of BRECQ and QDrop initialises its weight
quantizers (``quant/quant_layer.py``, ``scale_method='mse'``: the range shrunk
by 1% a step over 80 steps, the Lp error with p = 2.4 kept lowest), and what
MQBench's round-to-nearest "MSE" rows use (MobileNetV2 W4A8: 35.7% top-1
against 27.6% with max-abs). hago's weights stay symmetric (realize's
integer kernels have no weight zero point), so only the step moves.

The step goes into ``OpChoice.weight_scale``; realize, simulate, and the
learned-rounding corrections (:mod:`hago.correct.adaround`,
:mod:`hago.correct.brecq`, which read :mod:`hago.correct.rounding`'s grid) all
use it. Run it first: ``--corrections weight_clip,adaround_conv,bias``.

One guard, as realize's own: the step never falls below the floor at which
the quantized bias still fits the int32 accumulator (:func:`hago.qparams.bias_scale_floor`,
doubled here to leave room for a later bias correction's delta). Layers whose
input is quantized per row at run time (dynamic) keep max-abs steps: their
kernel quantizes its weights itself.
"""

from __future__ import annotations

import numpy as np

from hago.correct.base import Correction, CorrectionContext, register
from hago.qparams import bias_scale_floor, integer_range
from hago.realize.quant import weight_axis

#: BRECQ's search: shrink the max-abs range 1% a step, 80 steps (down to 21% of it)
SHRINKS = 1.0 - 0.01 * np.arange(80)


def lp_steps(w: np.ndarray, axis: int, bits: int, p: float = 2.4,
             shrinks: np.ndarray = SHRINKS) -> np.ndarray:
    """Per channel along ``axis``: the symmetric narrow-range step with the least ``sum |w - Q(w)|^p``.

    Candidates are ``shrink * max|w_c| / qmax`` for each ``shrink``; a channel of zeros keeps step 1.
    """
    _, qmax = integer_range("int8", bits, narrow=True)
    rows = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)  # [C, K]
    amax = np.abs(rows).max(axis=1)
    best = np.full(len(rows), np.inf)
    step = np.where(amax > 0, amax / qmax, 1.0)
    for a in shrinks:
        s = np.where(amax > 0, a * amax / qmax, 1.0)[:, None]
        err = (np.abs(rows - s * np.clip(np.round(rows / s), -qmax, qmax)) ** p).sum(axis=1)
        better = err < best
        best = np.where(better, err, best)
        step = np.where(better, s[:, 0], step)
    return step


def floored(node, step: np.ndarray, input_scale: float) -> np.ndarray:
    """``step`` no finer than twice realize's bias floor (:func:`hago.qparams.bias_scale_floor`).

    A given step is used by realize as it is; the margin leaves room for a
    later bias correction's delta before the quantized bias would overflow.
    """
    floor = bias_scale_floor(node.bias, input_scale)
    return step if floor is None else np.maximum(step, 2.0 * floor)


@register("weight_clip")
class WeightClip(Correction):
    """Set every integer layer's per-channel weight step to its least-Lp-error one (``p``, BRECQ's 2.4).

    ``max_bits``: only layers with at most this many weight bits (8: all; 4: the 4-bit ones).
    """

    local = True  # a layer's step depends on its own weights, bits and input scale only
    writes_weights = True

    def __init__(self, p: float = 2.4, max_bits: int = 8):
        self.p, self.max_bits = p, max_bits

    def run(self, ctx: CorrectionContext) -> dict:
        s = ctx.strategy
        done, shrink = 0, []
        for node in ctx.graph.nodes:
            op = s.ops.get(node.name)
            if (not node.weighted or op is None or op.mode != "integer" or not op.weight_bits
                    or op.weight_bits > self.max_bits or op.multipoint is not None
                    or op.weight_scale_in is not None or op.weight_scale is not None
                    or op.weight_round is not None):
                continue
            edge = s.resolved(node.inputs[0])
            if edge.dynamic or edge.qparams is None or np.asarray(edge.qparams.scale).size != 1:
                continue
            axis = weight_axis(node)
            step = floored(node, lp_steps(node.weight, axis, op.weight_bits, self.p),
                           float(np.asarray(edge.qparams.scale).ravel()[0]))
            _, qmax = integer_range("int8", op.weight_bits, narrow=True)
            amax = np.abs(np.moveaxis(node.weight, axis, 0).reshape(len(step), -1)).max(axis=1)
            live = amax > 0
            shrink.extend((step[live] * qmax / amax[live]).tolist())
            op.weight_scale = [float(v) for v in step.astype(np.float32)]
            done += 1
        return {"layers": done, "mean_shrink": round(float(np.mean(shrink)), 4) if shrink else 1.0}
