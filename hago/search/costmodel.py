"""Latency models over strategies: a per-layer prior and a learned correction, retrained as measurements arrive.

The prior (:class:`LayerPrior`) needs two measurements, the all-integer build
and FP32: making a layer float costs its share of their difference, shared by
multiply-accumulates (an untuned float conv costs in proportion to its work),
and a narrower weight width costs its share of what the narrowest build
saves, zero on devices where it runs the same kernels.

The learned model (:class:`LatencyModel`, xgboost) encodes candidates per knob
(one-hot of its choice), so it learns what each layer's precision costs on
this device, interactions included (a float layer between two integer ones
also pays two conversions). Given the prior as ``base`` it learns the
log-ratio of measured to prior; with fewer than ``min_samples`` measurements
it predicts the mean (ratio), so the search falls back to the prior.
"""

from __future__ import annotations

import numpy as np

from .space import BF16, Point, SearchSpace


def layer_macs(graph, space: SearchSpace) -> np.ndarray:
    """Multiply-accumulates of each weight knob's layer at batch 1 (0 for activation knobs)."""
    out = np.zeros(len(space.knobs))
    for i, k in enumerate(space.knobs):
        if k.kind != "weight":
            continue
        try:
            node = graph.node(k.name)
            shape = [int(d) for d in node.out_var.ty.shape]
            numel = float(np.prod(shape))
            channels = shape[1] if len(shape) == 4 else shape[-1]
            out[i] = numel * node.weight.size / max(channels, 1) if node.weight is not None else numel
        except Exception:  # an unusual node: count it as one average layer below
            out[i] = np.nan
    if np.isnan(out).any():
        fill = np.nanmean(out) if np.isfinite(np.nanmean(out)) else 1.0
        out = np.where(np.isnan(out), fill, out)
    return out


class LayerPrior:
    """``latency(point)`` from the all-integer (``top``) and FP32 times, spread over layers by work."""

    def __init__(self, space: SearchSpace, macs: np.ndarray, top: Point, top_ms: float,
                 fp32_ms: float | None, narrow_ms: float | None = None, bf16_ms: float | None = None):
        self.space, self.top, self.top_ms = space, top, top_ms
        share = macs / macs.sum() if macs.sum() > 0 else np.full(len(macs), 1.0 / max(len(macs), 1))
        self.float_cost = share * ((fp32_ms - top_ms) if fp32_ms is not None else top_ms)
        self.narrow_cost = share * ((narrow_ms - top_ms) if narrow_ms is not None else 0.0)
        # bf16: the all-bf16 build's extra time over the layers it moves, by work; unmeasured, half of float's
        in_bf16 = np.array([k.kind == "weight" and BF16 in k.choices for k in space.knobs])
        bf16_macs = macs * in_bf16
        if bf16_ms is not None and bf16_macs.sum() > 0:
            self.bf16_cost = bf16_macs / bf16_macs.sum() * (bf16_ms - top_ms)
        else:
            self.bf16_cost = 0.5 * self.float_cost

    def __call__(self, points: list[Point]) -> np.ndarray:
        out = []
        for p in points:
            lat = self.top_ms
            for i, (k, b) in enumerate(zip(self.space.knobs, p)):
                if k.kind != "weight" or b == self.top[i]:
                    continue
                lat += self.float_cost[i] if b == 0 else self.bf16_cost[i] if b == BF16 else self.narrow_cost[i]
            out.append(max(lat, 1e-3 * self.top_ms))
        return np.asarray(out, np.float64)


class LatencyModel:
    def __init__(self, space: SearchSpace, min_samples: int = 3, seed: int = 0):
        self.space, self.min_samples, self.seed = space, min_samples, seed
        self._model = None
        self._mean = None

    def features(self, points: list[Point]) -> np.ndarray:
        cols = []
        for i, k in enumerate(self.space.knobs):
            for c in k.choices:
                cols.append([1.0 if p[i] == c else 0.0 for p in points])
        return np.asarray(cols, np.float32).T.reshape(len(points), -1)

    def fit(self, points: list[Point], latencies: list[float], base=None) -> None:
        """Fit log latency, or with ``base`` (prior latencies of the same points) the log of measured/prior."""
        y = np.log(np.asarray(latencies, np.float64)) if latencies else np.zeros(0)
        if base is not None and len(y):
            y = y - np.log(np.asarray(base, np.float64))
        self._residual = base is not None
        self._mean = float(np.mean(y)) if len(y) else None
        if len(points) < self.min_samples:
            self._model = None
            return
        import xgboost as xgb

        params = {"max_depth": 3, "eta": 0.3, "seed": self.seed, "nthread": 1, "verbosity": 0}
        dtrain = xgb.DMatrix(self.features(points), label=y)
        self._model = xgb.train(params, dtrain, num_boost_round=60)

    def predict(self, points: list[Point], base=None) -> np.ndarray:
        if not points:
            return np.zeros(0)
        if self._model is None:
            y = np.full(len(points), self._mean if self._mean is not None else (0.0 if base is not None else np.nan))
        else:
            import xgboost as xgb

            y = self._model.predict(xgb.DMatrix(self.features(points))).astype(np.float64)
        if base is not None:
            y = y + np.log(np.asarray(base, np.float64))
        return np.exp(y)
