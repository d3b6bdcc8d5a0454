"""Empirical bias correction (Nagel et al. 2019, DFQ sec. 4.2; NNCF's and ORT's "bias correction").

Rounding a layer's weights changes ``E[y]`` per output channel by
``(W_q - W) E[x]``, and rounding/clipping its input adds ``W (E[x_q] - E[x])``.
Such mean errors pass through every later layer and, summed over ~50 layers
(EfficientNet-Lite0), move logits enough to flip top-1 on close calls. The
fix is cheap and exact in the mean: ``bias -= E[y_quant] - E[y_fp32]`` per
output channel, over the calibration samples, measured on the layer output
before its own output quantization. Two ways to measure ``E[y_quant]``:

* ``local`` (default; NNCF's *fast* bias correction): the layer's quantized
  twin on the FP32 input (input fake-quantized, weights rounded). Every layer
  becomes unbiased on its own; one build and one pass over the samples.
* ``sequential`` (Nagel's empirical correction, AIMET's): the whole simulated
  quantized network, layer by layer in topological order, each layer seeing
  the already corrected layers before it. One pass per layer (``max_samples``
  bounds its cost); biases are run-time inputs of one compiled program.

Both measure against the FP32 network's own outputs (``ctx.graph``, its own
biases: an earlier correction's bias deltas, ``dfmpc``'s, are not part of the
target), and take each layer's weights and bias from the corrected graph.

Correcting all layers at once from one propagated measurement, and iterating,
does NOT work: an upstream change moves downstream means with gains >> 1, and
on EfficientNet-Lite0 the error grew ~3x per iteration (0.08 -> 0.43 -> 1.6 ->
4.4 -> 9.4, relative). Hence the two modes above.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tvm
from tvm import relax

from hago import build as build_mod
from hago.correct.base import Correction, CorrectionContext, channels, corrected_graph, register
from hago.data import Samples
from hago.simulate import simulate

log = logging.getLogger(__name__)


def _batch(ctx: CorrectionContext) -> int:
    return max(1, min(ctx.batch_size, len(ctx.samples)))


def _probe_vm(mod: tvm.IRModule, ctx: CorrectionContext):
    """Build ``mod`` for a static batch (hago's fused, parallel CPU build needs static shapes)."""
    ex = build_mod.build(build_mod.static_batch(mod, _batch(ctx)), ctx.target, "bias-correction probe")
    return relax.VirtualMachine(ex, tvm.cpu())


def _run_means(vm, ctx: CorrectionContext, extra_args=()) -> list[np.ndarray]:
    """Per-channel means of each tap over the calibration samples (float64).

    The taps average over the whole batch (``simulate._channel_mean``: a
    dense layer's batch may be merged into its rows), so only whole batches
    run: a last, partial batch is left out (at most ``batch - 1`` samples)
    rather than padded, since padding rows would enter the means.
    """
    names = [p.name for p in ctx.graph.params]
    extra = [tvm.runtime.tensor(np.ascontiguousarray(a, np.float32)) for a in extra_args]
    bs = _batch(ctx)
    sums, n = None, 0
    for batch in ctx.samples.batches(bs):
        if len(next(iter(batch.values()))) < bs:
            continue
        arrays = [np.ascontiguousarray(batch[m]) for m in names]
        outs = vm["main"](*[tvm.runtime.tensor(a) for a in arrays], *extra)
        vals = [outs[i].numpy().astype(np.float64) for i in range(len(outs))]
        sums = vals if sums is None else [s + v for s, v in zip(sums, vals)]
        n += 1
    return [s / n for s in sums]


@register("bias")
class BiasCorrection(Correction):
    """Subtract each integer layer's per-channel mean output error from its bias.

    ``mode`` is ``local`` or ``sequential`` (module docstring); ``max_samples``
    limits the samples a sequential pass runs on. The report gives the mean
    absolute per-channel error relative to the FP32 mean magnitude, per layer
    averaged, before and after (``local``: of the layers' own errors).
    """

    local = True  # in the default mode; the sequential subclass is not

    def __init__(self, mode: str = "local", max_samples: int | None = None):
        if mode not in ("local", "sequential"):
            raise ValueError(f"bias correction mode {mode!r}: use local or sequential")
        self.mode, self.max_samples = mode, max_samples

    def run(self, ctx: CorrectionContext) -> dict:
        g, s = ctx.graph, ctx.strategy
        layers = [n.name for n in g.nodes if n.weighted and s.ops[n.name].mode == "integer"]
        if not layers:
            return {"layers": 0}
        base = corrected_graph(g, s)  # earlier corrections, if any, stay in
        delta, report = (self._local if self.mode == "local" else self._sequential)(ctx, base, layers)
        for name, d in zip(layers, delta):
            op = s.ops[name]
            prev = np.asarray(op.bias_delta, np.float64) if op.bias_delta is not None else 0.0
            op.bias_delta = [float(v) for v in (prev + d).astype(np.float32)]
        return {"layers": len(layers), "mode": self.mode, **report}

    @staticmethod
    def _local(ctx, base, layers):
        # the network runs on the FP32 graph (the target, and every twin's input); each twin takes its
        # weights and bias from the corrected graph (an earlier correction's rounding, codes, deltas)
        out = _run_means(_probe_vm(simulate(ctx.graph, ctx.strategy, fake=False, taps=layers, local=True,
                                            twin_graph=base), ctx), ctx)
        ref, twin = out[0::2], out[1::2]
        err = [t - r for t, r in zip(twin, ref)]
        return [-e for e in err], {"relative_error_before": _relative(err, ref)}

    def _sequential(self, ctx, base, layers):
        sub = ctx
        if self.max_samples and len(ctx.samples) > self.max_samples:
            arrays = {k: v[: self.max_samples] for k, v in ctx.samples.arrays.items()}
            sub = dataclasses.replace(ctx, samples=Samples(arrays))
        ref = _fp32_means(ctx, sub, layers)
        b0 = [base.node(n).bias if base.node(n).bias is not None else np.zeros(channels(base.node(n)), np.float32)
              for n in layers]
        vm = _probe_vm(simulate(base, ctx.strategy, bias_inputs=layers, taps=layers), sub)
        delta = [np.zeros_like(b, np.float64) for b in b0]
        before = None
        for i in range(len(layers) + 1):
            means = _run_means(vm, sub, [b + d for b, d in zip(b0, delta)])
            err = [m - r for m, r in zip(means, ref)]
            before = before if before is not None else _relative(err, ref)
            if i == len(layers):
                return delta, {"relative_error_before": before, "relative_error_after": _relative(err, ref)}
            delta[i] = delta[i] - err[i]  # layer i is exact now: everything before it is corrected
            log.debug("sequential bias correction: %s done", layers[i])


def _fp32_means(ctx, sub, layers):
    """Per layer, the FP32 network's per-sample channel means over ``sub``'s samples: the target.

    From ``ctx.graph``, not the corrected graph: ``simulate(fake=False)`` keeps
    the function's own weight constants either way, but takes each layer's bias
    from the graph it is given, and an earlier correction's bias delta is not FP32.
    """
    return _run_means(_probe_vm(simulate(ctx.graph, ctx.strategy, fake=False, taps=layers), sub), sub)


def _relative(err, ref) -> float:
    """Mean over layers of mean |per-channel error| / mean |FP32 per-channel mean| (floored)."""
    return round(float(np.mean([np.abs(e).mean() / max(float(np.abs(r).mean()), 1e-6)
                                for e, r in zip(err, ref)])), 5)


@register("bias_sequential")
class SequentialBiasCorrection(BiasCorrection):
    """``bias`` in ``sequential`` mode on at most 32 samples (one pass per layer: slow on deep nets)."""

    local = False  # each layer's delta depends on every layer before it

    def __init__(self, max_samples: int | None = 32):
        super().__init__("sequential", max_samples)
