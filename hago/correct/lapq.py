"""LAPQ: loss-aware clipping of the activation edges (Nahshan et al., "Loss Aware Post-training Quantization").

Per-edge calibration (minmax, mse, kl) picks each clip on its own; at low
activation bits the clips interact, and the network's loss is what matters.
LAPQ, as the reference ``lapq/lapq_v2.py`` does it (``../shared/notes/lowbit.md``):

1. for ``p`` in ``linspace(2, 4, 10)``: every edge gets its Lp-optimal clip
   (:mod:`hago.correct.lp_clip`), and the network loss is measured;
2. a quadratic in ``p`` is fitted to those losses; its minimum (in [2, 4])
   gives the starting clips (hago starts from the better of that and the best
   sampled ``p``, both measured);
3. ``scipy.optimize.minimize(method="Powell")`` searches all clips jointly on
   the network loss, within ``maxfev`` loss evaluations (and ``time_budget_s``).

The loss is the cross-entropy with the labels when the calibration samples
have them and the model's output is ``[N, classes]``; without labels, the KL
of the quantized model's softmax against FP32's; for an output that is not
``[N, classes]``, the mean squared error against FP32 (``loss="mse"`` forces
it: on a confident classifier it is the steadier loss, see below). It runs on
whole batches of the calibration samples (the build is static): the first
``max_samples`` fit the clips, the next ones (as many again, at most) check
them (:class:`Lapq`).

Measured on the MNIST CNN at 4-bit activations (1024 calibration images,
512 fit / 512 check, 260 Powell evaluations, about 25 s on 2 busy cores):
the KL of a confident classifier lives in a handful of images (most batches
score 0), so the fitted KL and the KL on other images disagree by up to 100x
and Powell's gains on the fit half do not carry over; with ``loss="mse"``
(logits against FP32) the mse-calibrated ranges' 14.8 went to 4.16 with the
Lp start and 3.86 with Powell on the fit half, 11.5 / 4.16 / 4.18 on the
check half (the Lp start kept), and 12.8 -> 3.96 on 2000 held-out images.

Each loss evaluation re-runs one compiled simulated program
(:func:`hago.simulate.simulate` with ``range_inputs``: every searched edge's
scale and zero point are run-time inputs), so nothing is rebuilt.

What is searched: the strategy's static activation edges (quantized, owning
their parameters: not aliases, not dynamic per-row edges, not float), one
parameter per edge, the shrink ``alpha`` of the edge's observed range
(:mod:`hago.correct.lp_clip`: both ends of an asymmetric range by the same
factor, which keeps its zero point). Weights keep hago's per-channel
symmetric ranges: LAPQ's per-tensor weight clipping exists because its
weights are per-tensor; per-channel max-abs scales leave little to clip, and
the integer build's weights need no change to take a new activation range.

Output: ``EdgeChoice.range`` and ``.qparams`` of the searched edges (the one
kind of correction that changes ranges: :mod:`hago.correct.base`), from the
Lp start or Powell's best, whichever has the lesser check loss, and only if
that beats the strategy's own calibrated ranges there; otherwise the strategy
is left as it was. Run it before ``bias``
(``--corrections lapq,bias``), which measures errors with the final ranges.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import tvm
from scipy.optimize import minimize
from tvm import relax

from hago import build as build_mod
from hago.calibrate.histogram import StreamingHistogram
from hago.correct.base import Correction, CorrectionContext, corrected_graph, register
from hago.correct.lp_clip import lp_alphas, shrunk_qparams, shrunk_range
from hago.observe import probe_module
from hago.simulate import range_input_values, simulate

log = logging.getLogger(__name__)

#: the p values LAPQ sweeps for its initial clips (the reference's linspace(2, 4, 10))
PS = tuple(float(p) for p in np.linspace(2.0, 4.0, 10))
#: the smallest shrink Powell may try: 2% of the observed range
MIN_ALPHA = 0.02
#: histogram bins per edge for the Lp search (hago's calibration default)
HIST_BINS = 2048
#: Powell's initial step along each edge's shrink (its line searches start this close to the current point)
STEP = 0.05


class _OutOfTime(Exception):
    """Raised inside the objective to stop Powell at the time budget."""


def searched_edges(strategy) -> list[str]:
    """The static activation edges LAPQ clips: quantized, calibrated, owning their parameters."""
    return [e for e, c in strategy.edges.items()
            if c.bits and c.alias_of is None and not c.dynamic and c.qparams is not None]


@register("lapq")
class Lapq(Correction):
    """Lp-norm initial clips, then a joint Powell search of all activation clips on the network loss.

    ``maxfev``: loss evaluations Powell may use (default ``40 * edges + 100``,
    at most 600); ``time_budget_s`` stops it earlier; ``max_samples``: the
    samples the search's loss runs on (the *fit* half); ``loss``: ``auto``
    (module docstring), ``ce``, ``kl`` or ``mse``.

    The search fits its clips to few samples, and at 4 bits the loss is rugged
    in the clips (rounding coincidences of those samples): on the MNIST CNN,
    Powell's point cut the fitted KL 3x and *raised* the KL on other images.
    So the calibration samples after the fit half (as many again, at most) are
    a *check* half: of the calibrated ranges, the Lp start and Powell's best,
    the one with the least check loss is kept (without a check half: the least
    fit loss). The report gives each loss on both halves, the ``p`` values, the
    evaluations, what was kept and the seconds taken.
    """

    local = False  # the clips are chosen jointly, on the whole network's loss

    def __init__(self, maxfev: int | None = None, time_budget_s: float = 60.0, max_samples: int = 256,
                 loss: str = "auto", candidates: int = 100):
        if loss not in ("auto", "ce", "kl", "mse"):
            raise ValueError(f"lapq loss {loss!r}: use auto, ce, kl or mse")
        self.maxfev, self.time_budget_s, self.max_samples = maxfev, time_budget_s, max_samples
        self.loss, self.candidates = loss, candidates

    def run(self, ctx: CorrectionContext) -> dict:
        t0 = time.perf_counter()
        s = ctx.strategy
        edges = searched_edges(s)
        if not edges:
            return {"edges": 0}
        objective = _Objective(ctx, edges, self.max_samples, self.loss)
        hists = objective.hists

        def lp(ps):  # [p, edge]: each edge's Lp-optimal shrink for each p
            return np.stack([lp_alphas(hists[e], s.edges[e].dtype, s.edges[e].bits, s.edges[e].symmetric, ps,
                                       self.candidates) for e in edges], axis=1)

        # (a) Lp-optimal clips for each p, and the loss of each set
        per_p = lp(PS)
        losses = np.array([objective(a) for a in per_p])
        best_i = int(np.argmin(losses))
        # (b) a quadratic in p; its minimum (clamped to [2, 4]) when it opens upwards
        c2, c1, _ = np.polyfit(PS, losses, 2)
        p_star = float(np.clip(-c1 / (2 * c2), PS[0], PS[-1])) if c2 > 0 else PS[best_i]
        a_star = lp([p_star])[0]
        loss_star = objective(a_star)
        x0 = a_star if loss_star <= losses[best_i] else per_p[best_i]

        # (c) Powell, jointly over one shrink per edge
        maxfev = self.maxfev if self.maxfev is not None else min(600, 40 * len(edges) + 100)
        deadline = time.perf_counter() + self.time_budget_s
        before = objective.evaluations

        def f(a):
            if time.perf_counter() > deadline:
                raise _OutOfTime
            return objective(np.clip(a, MIN_ALPHA, 1.0))

        stopped = "maxfev"
        try:
            # No ``bounds``: scipy's bounded line search golden-sections the whole feasible segment, and on a
            # rugged low-bit loss lands in any dip of it; unbounded, Brent brackets outward from the current
            # point in steps of ``direc`` (``STEP`` in alpha) and never returns a point worse than it.
            res = minimize(f, np.clip(x0, MIN_ALPHA, 1.0), method="Powell",
                           options={"maxfev": maxfev, "xtol": 1e-2, "ftol": 1e-4,
                                    "direc": STEP * np.eye(len(edges))})
            stopped = "converged" if res.success else "maxfev"
        except _OutOfTime:
            stopped = "time budget"
        powell_evals = objective.evaluations - before

        # (d) keep the calibrated ranges, the Lp start or Powell's best: the least loss on the check half
        calibrated = [s.edges[e].qparams for e in edges]
        cands = {"calibrated": calibrated, "lp": objective.qparams(x0), "powell": objective.qparams(objective.best[0])}
        fit = {k: objective.loss_of(q) for k, q in cands.items()}
        check = {k: objective.loss_of(q, check=True) for k, q in cands.items()} if objective.check else {}
        kept = min(cands, key=lambda k: (check or fit)[k])
        if kept != "calibrated":
            alphas = x0 if kept == "lp" else objective.best[0]
            for e, a in zip(edges, alphas):
                c = s.edges[e]
                lo, hi = hists[e].min, hists[e].max
                c.range = tuple(float(v) for v in shrunk_range(lo, hi, float(a), c.symmetric))
                c.qparams = shrunk_qparams(lo, hi, float(a), c.dtype, c.bits, c.symmetric)
        report = {"edges": len(edges), "loss": objective.kind, "fit_samples": objective.samples(),
                  "check_samples": objective.samples(check=True),
                  "loss_calibrated": _r(fit["calibrated"]), "loss_best_p": _r(losses[best_i]),
                  "best_p": round(PS[best_i], 3), "loss_quadratic_p": _r(loss_star), "quadratic_p": round(p_star, 3),
                  "loss_start": _r(fit["lp"]), "loss_final": _r(fit["powell"]),
                  **{f"check_{k}": _r(v) for k, v in check.items()},
                  "powell_evaluations": powell_evals, "powell_stopped": stopped, "kept": kept,
                  "seconds": round(time.perf_counter() - t0, 2)}
        log.info("lapq: fit loss calibrated %s, Lp start %s, Powell %s; check loss %s; kept %s; %d edges, %.1f s",
                 report["loss_calibrated"], report["loss_start"], report["loss_final"],
                 {k: _r(v) for k, v in check.items()} or "none", kept, len(edges), report["seconds"])
        return report


def _r(v) -> float:
    return float(f"{float(v):.6g}")


class _Objective:
    """The network loss as a function of the per-edge shrinks, on one compiled simulated program.

    Calls (``objective(alphas)``) run on the fit batches and keep the best
    shrinks seen (Powell's result under ``maxfev`` need not be its best point);
    :meth:`loss_of` with ``check=True`` runs on the check batches.
    """

    def __init__(self, ctx: CorrectionContext, edges: list[str], max_samples: int, kind: str):
        s = ctx.strategy
        self.edges, self.strategy = edges, s
        n = min(len(ctx.samples), 2 * max_samples)
        bs = max(1, min(ctx.batch_size, n, max_samples))
        names = [p.name for p in ctx.graph.params]
        batches = [[tvm.runtime.tensor(np.ascontiguousarray(ctx.samples.arrays[m][i:i + bs])) for m in names]
                   for i in range(0, n - n % bs, bs)]
        n_fit = max(1, min(max_samples // bs, (len(batches) + 1) // 2))  # the first half, at most max_samples
        self.hists, ref = _fp32_pass(ctx, edges, bs, len(batches))
        sim = simulate(corrected_graph(ctx.graph, s), s, range_inputs=edges)
        self.vm = _vm(sim, bs, ctx.target)
        labels = ctx.samples.labels
        classifier = len(ref[0]) == 1 and ref[0][0].ndim == 2 and ref[0][0].shape[1] > 1
        if kind == "auto":
            kind = "ce" if classifier and labels is not None else "kl" if classifier else "mse"
        self.kind = kind
        if kind == "ce":
            lab = np.asarray(labels).astype(np.int64).reshape(-1)
            targets = [lab[i * bs:(i + 1) * bs] for i in range(len(batches))]
        elif kind == "kl":
            targets = [_log_softmax(r[0].astype(np.float64)) for r in ref]
        else:
            targets = ref
        self.fit = list(zip(batches[:n_fit], targets[:n_fit]))
        self.check = list(zip(batches[n_fit:], targets[n_fit:]))
        self.batch = bs
        self.evaluations = 0
        self.best = (None, np.inf)

    def samples(self, check: bool = False) -> int:
        return self.batch * len(self.check if check else self.fit)

    def qparams(self, alphas) -> list:
        """Each edge's parameters for its observed range shrunk by its ``alpha``."""
        return [shrunk_qparams(self.hists[e].min, self.hists[e].max, float(a), self.strategy.edges[e].dtype,
                               self.strategy.edges[e].bits, self.strategy.edges[e].symmetric)
                for e, a in zip(self.edges, alphas)]

    def loss_of(self, qps, check: bool = False) -> float:
        """The mean loss per sample of the simulated model with edge parameters ``qps``."""
        extra = [tvm.runtime.tensor(range_input_values(qp)) for qp in qps]
        total = 0.0
        for batch, target in (self.check if check else self.fit):
            out = _outputs(self.vm["main"](*batch, *extra))
            if self.kind == "ce":
                logq = _log_softmax(out[0].astype(np.float64))
                total -= float(logq[np.arange(len(logq)), target].sum())
            elif self.kind == "kl":
                logq = _log_softmax(out[0].astype(np.float64))
                total += float((np.exp(target) * (target - logq)).sum())
            else:  # each batch's mean squared error over all outputs, weighted by its samples
                total += self.batch * sum(float(((o.astype(np.float64) - r) ** 2).mean()) for o, r in zip(out, target))
        return total / self.samples(check)

    def __call__(self, alphas) -> float:
        a = np.asarray(alphas, np.float64)
        loss = self.loss_of(self.qparams(a))
        self.evaluations += 1
        if loss < self.best[1]:
            self.best = (a.copy(), loss)
        return loss


def _fp32_pass(ctx: CorrectionContext, edges: list[str], batch: int, ref_batches: int) -> tuple[dict, list]:
    """One FP32 pass over the calibration samples: each edge's histogram, and the model outputs of the first
    ``ref_batches`` batches (the loss's reference).

    An edge's values are those of the edge its range is observed at (``observe_at``: after a fused ReLU),
    as calibration saw them. One program returns the observed edges and the output, so the pass costs one build.
    """
    sources = {e: ctx.strategy.edges[e].observe_at or e for e in edges}
    observed = sorted(set(sources.values()))
    probe = probe_module(ctx.fp32, ctx.graph, observed, with_output=True)
    vm = relax.VirtualMachine(tvm.compile(probe, target=ctx.target), tvm.cpu())
    names = [p.name for p in ctx.graph.params]
    hists = {o: StreamingHistogram(HIST_BINS, o) for o in observed}
    ref = []
    for i, batch in enumerate(ctx.samples.batches(batch)):
        outs = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(batch[n])) for n in names])
        for k, o in enumerate(observed):
            hists[o].update(outs[k].numpy())
        if i < ref_batches:
            ref.append(_outputs(outs[len(observed)]))
    return {e: hists[sources[e]] for e in edges}, ref


def _vm(mod, batch: int, target):
    ex = build_mod.build(build_mod.static_batch(mod, batch), target, "lapq probe")
    return relax.VirtualMachine(ex, tvm.cpu())


def _outputs(out) -> list[np.ndarray]:
    """A VM result (a tensor or a nested tuple of them) as a flat list of arrays."""
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [a for o in out for a in _outputs(o)]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
