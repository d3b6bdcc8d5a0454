"""Search algorithms: each takes the engine and asks it for accuracies and latencies.

* ``greedy``: HAGO's edge-by-edge search, the baseline. Knob by knob, every
  choice is built and measured; the fastest that keeps the target stays.
* ``latency``: start from the fastest build (every layer integer, narrowest);
  while it misses the target, restore precision where accuracy gained per
  predicted millisecond is highest. Accuracy is cheap (host); latency is
  measured only for points that meet the target.
* ``evolve``: cost-model-guided evolution. Accuracy is measured on the host
  for a population grown by mutation; an xgboost latency model trained on the
  measurements so far picks which candidates meeting the target are worth a
  device measurement; finalists are confirmed end to end.

FP32 (every layer float) is always measured, so the answer is never slower
than FP32 without the report saying so.
"""

from __future__ import annotations

import random

import numpy as np

from .costmodel import LatencyModel

ALGORITHMS = {}


def register(name):
    def deco(fn):
        ALGORITHMS[name] = fn
        return fn

    return deco


def _fp32_baseline(engine) -> None:
    if any(k.kind == "weight" and 0 in k.choices for k in engine.space.knobs):
        engine.latency(engine.space.all_float())


@register("greedy")
def greedy(engine) -> None:
    point = list(engine.space.widest())
    engine.latency(tuple(point))
    for i, knob in enumerate(engine.space.knobs):
        best = None
        for choice in knob.choices:
            p = tuple(point[:i] + [choice] + point[i + 1:])
            c = engine.latency(p)
            if c.accuracy >= engine.threshold and c.latency_ms is not None:
                if best is None or c.latency_ms < best.latency_ms:
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


def _measured(engine):
    cands = [c for c in engine.all_candidates() if c.latency_ms is not None]
    return [c.point for c in cands], [c.latency_ms for c in cands]


@register("latency")
def latency_aware(engine) -> None:
    model = LatencyModel(engine.space)
    _fp32_baseline(engine)
    point = engine.space.narrowest()
    engine.latency(point)
    current = engine.accuracy(point)
    while current.accuracy < engine.threshold:
        ups = engine.space.neighbours(current.point, +1)
        if not ups:
            break
        model.fit(*_measured(engine))
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


@register("evolve")
def evolve(engine, population: int = 6, rounds: int = 4, per_round: int = 2, seed: int = 0) -> None:
    rng = random.Random(seed)
    space, model = engine.space, LatencyModel(engine.space, seed=seed)
    _fp32_baseline(engine)
    seeds = {space.narrowest(), space.widest()}
    while len(seeds) < population and len(seeds) < len(space):
        seeds.add(tuple(rng.choice(k.choices) for k in space.knobs))
    pool = {p: engine.accuracy(p) for p in seeds}
    for _ in range(rounds):
        good = [c for c in pool.values() if c.accuracy >= engine.threshold]
        model.fit(*_measured(engine))
        todo = [c for c in good if c.latency_ms is None and c.error is None]
        if todo:
            pred = _predict(engine, model, [c.point for c in todo])
            order = np.argsort(np.nan_to_num(pred, nan=0.0))
            for j in order[:per_round]:
                engine.latency(todo[j].point)
        # parents: the fastest measured (or predicted) good candidates, then mutate one or two knobs
        ranked = sorted(good, key=lambda c: c.latency_ms if c.latency_ms is not None else float("inf"))
        parents = [c.point for c in ranked[:3]] or list(pool)
        children = set()
        for _ in range(population):
            child = list(rng.choice(parents))
            for _ in range(rng.choice((1, 2))):
                i = rng.randrange(len(space.knobs))
                child[i] = rng.choice(space.knobs[i].choices)
            children.add(tuple(child))
        new = children - set(pool)
        if not new and not todo:
            break  # the neighbourhood is exhausted
        for p in new:
            pool[p] = engine.accuracy(p)
    # finalists: confirm the best predicted unmeasured good candidates end to end
    model.fit(*_measured(engine))
    good = [c for c in pool.values() if c.accuracy >= engine.threshold and c.latency_ms is None and c.error is None]
    if good:
        pred = _predict(engine, model, [c.point for c in good])
        for j in np.argsort(np.nan_to_num(pred, nan=0.0))[:2]:
            engine.latency(good[j].point)
