"""Search algorithms: each takes the engine and asks it for accuracies and latencies.

* ``greedy``: HAGO's edge-by-edge search, the baseline. Knob by knob, every
  choice is built and measured; the fastest that keeps the target stays.
* ``latency``: start from the fastest build (every layer integer, narrowest);
  while it misses the target, restore precision where accuracy gained per
  predicted millisecond is highest. Accuracy is cheap (host); latency is
  measured only for points that meet the target.
* ``evolve``: cost-model-guided search. FP32 and the all-integer build are
  measured; every other candidate's latency is predicted (kernel-cache
  estimate, else a per-layer prior corrected by an xgboost model trained on
  the measurements so far). Accuracy is measured on the host; only candidates
  that meet the target and are predicted faster than the best measured answer
  are measured on the device.

FP32 (every layer float) is always measured, so the answer is never slower
than FP32 without the report saying so.

With a weight budget (``engine.max_weight_bytes``) each algorithm steers by
size, not only the final choice: ``latency`` starts from the narrowest build
anyway and ``evolve`` starts there when the widest does not fit; both restore
precision only with steps that keep the point within the budget while such a
step exists, and ``evolve`` neither drops the narrower widths (they save bytes
even where they save no time) nor mutates towards points predicted over the
budget. ``greedy`` keeps, per knob, the fastest choice that still lets the
budget be met with every later knob at its smallest (else the one least over
it). Sizes of points not yet realized are predicted
(:meth:`~hago.search.engine.SearchEngine.point_bytes`); the engine's choice
uses the realized count.
"""

from __future__ import annotations

import random

import numpy as np

from .costmodel import LatencyModel, LayerPrior, layer_macs
from .space import BF16

ALGORITHMS = {}


def register(name):
    def deco(fn):
        ALGORITHMS[name] = fn
        return fn

    return deco


def _baseline_points(engine) -> list:
    """FP32, and the all-bf16 build where the space has bf16: measured first, every kernel of both gets a price."""
    points = []
    if any(k.kind == "weight" and 0 in k.choices for k in engine.space.knobs):
        points.append(engine.space.all_float())
    if engine.space.all_bf16() is not None:
        points.append(engine.space.all_bf16())
    return points


def _fp32_baseline(engine) -> None:
    engine.latencies(_baseline_points(engine))


def _budgeted(engine) -> bool:
    return getattr(engine, "max_weight_bytes", None) is not None


def _fits(engine, point) -> bool:
    """Whether ``point`` is predicted within the weight budget; True without one."""
    return not _budgeted(engine) or engine.fits(point)


def _keep_within_budget(engine, points: list) -> list:
    """The points predicted within the weight budget; all of them when none is (or there is no budget)."""
    if not _budgeted(engine):
        return points
    return [p for p in points if engine.fits(p)] or points


def _excess(engine, point, fixed: int) -> int:
    """Bytes over the weight budget that ``point`` cannot avoid once its first ``fixed`` knobs are set: the
    size with every later knob at its smallest choice (predicted; the realized count when nothing is left).
    0 within the budget or without one."""
    if not _budgeted(engine):
        return 0
    if fixed >= len(point):
        return max(0, engine.weight_bytes(point) - engine.max_weight_bytes)
    model = engine.size_model()
    floor = tuple(point[:fixed]) + tuple(min(model.deltas[j], key=lambda c: (model.deltas[j][c], c))
                                         for j in range(fixed, len(point)))
    return max(0, engine.point_bytes(floor) - engine.max_weight_bytes)


@register("greedy")
def greedy(engine) -> None:
    point = list(engine.space.widest())
    engine.latency(tuple(point))
    for i, knob in enumerate(engine.space.knobs):
        best = None
        # every choice of the knob at once: a farm measures them side by side; with a weight budget, the
        # choice that keeps the budget reachable (later knobs at their smallest) wins, the fastest among those
        for c in engine.latencies([tuple(point[:i] + [choice] + point[i + 1:]) for choice in knob.choices]):
            if c.accuracy >= engine.threshold and c.latency_ms is not None:
                if best is None or ((_excess(engine, c.point, i + 1), c.latency_ms)
                                    < (_excess(engine, best.point, i + 1), best.latency_ms)):
                    best = c
        if best is not None:
            point[i] = best.point[i]
    _fp32_baseline(engine)


def _predict(engine, model: LatencyModel, points: list) -> np.ndarray:
    """Per-kernel estimates where every kernel is cached, the learned model elsewhere."""
    learned = model.predict(points)
    out = []
    for p, guess in zip(points, learned):
        est = engine.estimate(p)
        out.append(est if est is not None else guess)
    return np.asarray(out, np.float64)


def _cheapest_raises(space, point, predict, allowed=None, engine=None) -> list:
    """Per knob, the more precise choice predicted fastest (bf16 or fp32 for an int8 layer): one candidate each.

    Scoring every more precise choice would double the accuracy runs of a
    bf16 spec; the predictor (kernel cache, measured all-bf16 and FP32
    builds) already knows which of them is cheaper on this device, and the
    accuracy they restore is close (bf16 keeps 8 mantissa bits). With
    ``engine`` under a weight budget, raises predicted over it are dropped
    while any raise stays within it.
    """
    ups = [p for p in space.raises(point) if allowed is None or all(b in a for b, a in zip(p, allowed))]
    if engine is not None:
        ups = _keep_within_budget(engine, ups)
    if not ups:
        return []
    best = {}
    for p, lat in zip(ups, predict(ups)):
        i = next(j for j, (x, y) in enumerate(zip(point, p)) if x != y)
        lat = float(lat) if np.isfinite(lat) else float("inf")
        if i not in best or lat < best[i][0]:
            best[i] = (lat, p)
    return [p for _, p in sorted(best.values(), key=lambda g: g[1])]


def _measured(engine):
    cands = [c for c in engine.all_candidates() if c.latency_ms is not None]
    return [c.point for c in cands], [c.latency_ms for c in cands]


@register("latency")
def latency_aware(engine) -> None:
    model = LatencyModel(engine.space)
    point = engine.space.narrowest()
    engine.latencies(_baseline_points(engine) + [point])
    current = engine.accuracy(point)
    while current.accuracy < engine.threshold:
        model.fit(*_measured(engine))
        ups = _cheapest_raises(engine.space, current.point, lambda pts: _predict(engine, model, pts), engine=engine)
        if not ups:
            break
        base = _predict(engine, model, [current.point])[0]
        pred = _predict(engine, model, ups)
        gains = []
        for p, lat in zip(ups, pred):
            c = engine.accuracy(p)
            cost = max(float(lat - base), 1e-3) if np.isfinite(lat) and np.isfinite(base) else 1.0
            gains.append(((c.accuracy - current.accuracy) / cost, c))
        current = max(gains, key=lambda g: g[0])[1]
    if current.accuracy >= engine.threshold:
        engine.latency(current.point)


def _meets(engine, c) -> bool:
    return c.accuracy is not None and c.accuracy >= engine.threshold


class _Predictor:
    """Latency of a candidate without measuring it: for a candidate already built (its kernel calls
    listed), the kernel-cache estimate, unknown kernels priced like known ones of their kind; else
    the per-layer prior corrected by the learned model."""

    def __init__(self, engine, prior, seed: int):
        self.engine, self.prior = engine, prior
        self.model = LatencyModel(engine.space, seed=seed)

    def refit(self) -> None:
        pts, lats = _measured(self.engine)
        self.model.fit(pts, lats, base=self.prior(pts) if pts else None)

    def __call__(self, points: list) -> np.ndarray:
        if not points:
            return np.zeros(0)
        learned = self.model.predict(points, base=self.prior(points))
        out = []
        for p, guess in zip(points, learned):
            est = self.engine.estimate_partial(p, build=False)
            out.append(est if est is not None else guess)
        return np.asarray(out, np.float64)


def _changes(space, point, allowed) -> list:
    """Every point that differs from ``point`` in one knob, within the allowed choices."""
    out = []
    for i, choices in enumerate(allowed):
        for c in choices:
            if c != point[i]:
                out.append(tuple(point[:i]) + (c,) + tuple(point[i + 1:]))
    return out


@register("evolve")
def evolve(engine, population: int = 8, rounds: int = 4, per_round: int = 2, seed: int = 0) -> None:
    """Cost-model-guided search: measure little, predict the rest.

    1. Measure FP32 and the all-integer build (widest weights): between them
       they time every float and every integer kernel (kernel cache), and
       they anchor the per-layer prior. One more build lists the narrowest
       build's kernels: where they are the same, narrower widths cannot be
       faster and are dropped from the space.
    2. While the fastest point misses the target, restore precision: score
       every single-knob step up once (accuracy on the host, no device
       time), then stack the steps in order of accuracy gained per
       predicted millisecond, doubling and bisecting the count to the
       fewest that meet the target.
    3. Rounds of mutation around the fastest candidates that meet the
       target: accuracy is evaluated only for children predicted faster than
       the best measured answer, and only the ``per_round`` fastest predicted
       of those meeting the target are measured on the device.
    """
    rng = random.Random(seed)
    space, tol = engine.space, engine.tie_tolerance
    top = engine.latencies(_baseline_points(engine) + [space.widest()])[-1]
    fp32 = engine.candidate(space.all_float())
    narrow = space.narrowest()
    allowed = [k.choices for k in space.knobs]
    narrow_ms = None
    if narrow != top.point:
        est_top, est_narrow = engine.estimate(top.point), engine.estimate(narrow)
        if est_top is not None and est_narrow is not None:
            narrow_ms = top.latency_ms * est_narrow / est_top if top.latency_ms and est_top > 0 else None
            # the same kernels: narrower weights only cost accuracy (unless a weight budget needs their bytes)
            if est_narrow >= est_top * (1 - tol) and not _budgeted(engine):
                allowed = [tuple(c for c in k.choices if c in (0, BF16, w)) if k.kind == "weight"
                           else k.choices for k, w in zip(space.knobs, top.point)]
    top_ms = top.latency_ms if top.latency_ms is not None else (fp32.latency_ms or 1.0)
    bf16 = engine.candidate(space.all_bf16()) if space.all_bf16() is not None else None
    prior = LayerPrior(space, layer_macs(engine.device_graph, space), top.point, top_ms,
                       fp32.latency_ms, narrow_ms, bf16.latency_ms if bf16 is not None else None)
    predict = _Predictor(engine, prior, seed)
    pool = {top.point: engine.accuracy(top.point)}
    start = top.point
    if narrow_ms is not None and narrow_ms < top_ms * (1 - tol):
        start = narrow  # narrower kernels are faster here: restore precision from the narrowest build
        pool[narrow] = engine.accuracy(narrow)
    elif _budgeted(engine) and not engine.fits(top.point) and narrow != top.point:
        start = narrow  # the widest build is over the weight budget: restore precision from the smallest
        pool[narrow] = engine.accuracy(narrow)

    # 2. restoration: accuracy only. Every single-knob step up is scored once (sensitivity); if none
    #    meets the target alone, the steps are stacked in order of accuracy gained per predicted
    #    millisecond, doubling how many until the target is met, then bisecting down.
    current = pool[start]
    while not _meets(engine, current):
        predict.refit()
        ups = _cheapest_raises(space, current.point, predict, allowed, engine)
        if not ups:
            break
        base, pred = predict([current.point])[0], predict(ups)
        cands = [engine.accuracy(p) for p in ups]
        pool.update((c.point, c) for c in cands)
        good = [(lat, c) for lat, c in zip(pred, cands) if _meets(engine, c)]
        if good:
            current = min(good, key=lambda g: (not _fits(engine, g[1].point), g[0], g[1].point))[1]
            break
        order = sorted(zip(pred, cands), key=lambda g: (-(g[1].accuracy - current.accuracy) / max(g[0] - base, 1e-3 * base),
                                                        g[1].point))

        def stacked(n, _from=current.point, _order=order):
            p = list(_from)
            keep_within = _budgeted(engine) and engine.fits(_from)
            for _, c in _order[:n]:
                i = next(j for j, (x, y) in enumerate(zip(_from, c.point)) if x != y)
                step = p[:i] + [c.point[i]] + p[i + 1:]
                if keep_within and not engine.fits(tuple(step)):
                    continue  # a step that would leave the weight budget is skipped, the next one tried
                p = step
            c = engine.accuracy(tuple(p))
            pool[c.point] = c
            return c

        n, hit = 2, None
        while n < len(order):
            if _meets(engine, c := stacked(n)):
                hit = (n // 2, n, c)
                break
            n *= 2
        if hit is None:
            c = stacked(len(order))
            if not _meets(engine, c):
                if c.point == current.point:
                    break  # every step would leave the weight budget: nothing more fits
                current = c
                continue  # every step taken and still short: climb again from there
            hit = (n // 2, len(order), c)
        lo, hi, best = hit  # stacked(lo) misses, stacked(hi) meets
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _meets(engine, c := stacked(mid)):
                hi, best = mid, c
            else:
                lo = mid
        current = best
    if _meets(engine, current):
        engine.latency(current.point)

    # 3. evolution around the fastest answers, measuring only predicted improvements
    for _ in range(rounds):
        predict.refit()
        measured_good = [c for c in engine.all_candidates()
                         if c.latency_ms is not None and _meets(engine, c) and _fits(engine, c.point)]
        best = min((c.latency_ms for c in measured_good), default=float("inf"))
        bound = best * (1 - tol)
        good = sorted((c for c in pool.values() if _meets(engine, c) and c.error is None),
                      key=lambda c: (not _fits(engine, c.point),
                                     c.latency_ms if c.latency_ms is not None else float("inf"), c.point))
        parents = [c.point for c in good[:3]] or [current.point]
        children = set()
        for parent in parents:
            children.update(_changes(space, parent, allowed))
            for _ in range(population):  # and a few two-knob jumps
                child = list(parent)
                for i in rng.sample(range(len(allowed)), min(2, len(allowed))):
                    child[i] = rng.choice(allowed[i])
                children.add(tuple(child))
        children = sorted(children - set(pool))
        if _budgeted(engine):  # only children predicted within the weight budget can win
            children = [p for p in children if engine.fits(p)]
        pred = predict(children)
        promising = [p for lat, p in sorted(zip(pred, children)) if lat < bound][:population]
        if not promising:
            break  # nothing left that the model expects to beat the best measured answer
        cands = [engine.accuracy(p) for p in promising]
        pool.update((c.point, c) for c in cands)
        good = [c for c in cands if _meets(engine, c)]
        if not good:
            continue
        pred = predict([c.point for c in good])  # built now: exact where every kernel is known
        engine.latencies([c.point for lat, c in sorted(zip(pred, good), key=lambda g: (g[0], g[1].point))[:per_round]
                          if lat < bound])
