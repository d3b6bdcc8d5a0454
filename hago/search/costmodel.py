"""A learned latency model over strategies, retrained as measurements arrive.

Candidates are encoded per knob (one-hot of its choice), so the model learns
what each layer's precision costs on this device, interactions included
(a float layer between two integer ones also pays two conversions). With
fewer than ``min_samples`` measurements it predicts the mean, so the search
falls back to exploring.
"""

from __future__ import annotations

import numpy as np

from .space import Point, SearchSpace


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

    def fit(self, points: list[Point], latencies: list[float]) -> None:
        self._mean = float(np.mean(latencies)) if latencies else None
        if len(points) < self.min_samples:
            self._model = None
            return
        import xgboost as xgb

        params = {"max_depth": 3, "eta": 0.3, "seed": self.seed, "nthread": 1, "verbosity": 0}
        dtrain = xgb.DMatrix(self.features(points), label=np.log(np.asarray(latencies, np.float64)))
        self._model = xgb.train(params, dtrain, num_boost_round=60)

    def predict(self, points: list[Point]) -> np.ndarray:
        if not points:
            return np.zeros(0)
        if self._model is None:
            return np.full(len(points), self._mean if self._mean is not None else np.nan)
        import xgboost as xgb

        return np.exp(self._model.predict(xgb.DMatrix(self.features(points))))
