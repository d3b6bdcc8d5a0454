"""Multipoint extra points as a search choice: fitted once per layer, cached as data, copied into candidates.

A weight knob's ``4+`` choice (:data:`hago.search.space.MULTIPOINT` + 4) is
4-bit weights plus the extra points of :mod:`hago.multipoint`. The points of a
layer depend only on its own weight, its weight bits and its input's
quantization (the calibrated scale floors the weight scale): the same
locality the search relies on for ``bias`` and ``adaround``. So the
``multipoint`` plug-in runs once, on one strategy that gives every such layer
its ``4+`` width, one probe pass for all their inputs, and each layer's points
are kept with the key they were fitted under (weight bits, input bits, input
dynamic). A candidate that picks ``4+`` for a layer gets those points when its
key matches; the realized program then carries the extra output channels, so
the device measurement and the byte count price them like any other choice.
The budget (a tenth of a layer's output channels) is rounded up to fill the
backend's output-channel block (``Backend.output_channel_block``: 16 on x86,
whose kernels pad channels to 16 anyway), so no padded lane is left idle.

The result is cached under the search's cache folder as JSON
(:mod:`.refcache`), keyed by the calibration data, graph and calibrator: a
resumed or repeated search fits nothing again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..correct import CorrectionContext
from ..correct.multipoint import Multipoint
from ..pipeline import CALIB_BATCH
from . import refcache
from .space import Point, SearchSpace, is_multipoint

log = logging.getLogger(__name__)

#: the plug-in's settings the search uses (a tenth of a layer's channels, up to 4 points per channel)
BUDGET, MAX_POINTS, MAX_SAMPLES = 0.1, 4, 32


def fitting_point(space: SearchSpace, base: Point) -> Point:
    """``base`` with every knob that has a multipoint choice at its first (narrowest) one."""
    return tuple(next((c for c in k.choices if is_multipoint(c)), b) if k.kind == "weight" else b
                 for k, b in zip(space.knobs, base))


def _decode(data) -> dict[str, tuple[tuple, dict]]:
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise ValueError("no layers")
    out = {}
    for name, rec in data["layers"].items():
        if not (isinstance(rec, dict) and isinstance(rec.get("points"), dict) and isinstance(rec.get("key"), list)
                and len(rec["key"]) == 3):
            raise ValueError(f"bad record for {name}")
        out[name] = (tuple(rec["key"]), rec["points"])
    return out


class SearchPoints:
    """Each multipoint-able layer's fitted points, with the layer key they hold for."""

    def __init__(self, layers: dict[str, tuple[tuple, dict]]):
        self.layers = layers

    @classmethod
    def fit(cls, engine, cache_dir: Path) -> "SearchPoints":
        """Fit (or load) the points of every layer with a ``4+`` choice in ``engine.space``."""
        names = [k.name for k in engine.space.knobs if k.kind == "weight" and any(map(is_multipoint, k.choices))]
        if not names:
            return cls({})
        from ..backends import backend_of

        block = backend_of(engine.spec).output_channel_block
        digest = engine._digest("multipoint", engine.calib_samples, engine.calibrator.name, engine.spec.name, block)
        path = Path(cache_dir) / "reference" / f"multipoint-{digest}.json"
        key = {"digest": digest, "graph_hash": engine.ghash, "calibrator": engine.calibrator.name,
               "spec": engine.spec.name, "channel_block": block, "budget": BUDGET, "max_points": MAX_POINTS,
               "max_samples": MAX_SAMPLES}
        data = refcache.load_json(path, "multipoint", key)
        if data is not None:
            try:
                return cls(_decode(data))
            except ValueError as e:  # well-formed JSON that is not ours: fit again
                log.warning("ignoring cached multipoint points %s (%s): fitting them again", path, e)
        strat = engine._strategy(fitting_point(engine.space, engine.space.widest()))
        plugin = Multipoint(BUDGET, MAX_POINTS, MAX_SAMPLES, block, layers=names)  # not the 8-bit ones
        ctx = CorrectionContext(engine.fp32, engine.graph, strat, engine.calib_samples, engine.host,
                                engine.prepared.batch_for(CALIB_BATCH))
        report = plugin.run(ctx)
        log.info("multipoint points for the search: %s", report)
        layers = {name: (engine._layer_key(strat, name), op.multipoint)
                  for name, op in strat.ops.items() if op.multipoint is not None}
        refcache.save_json(path, "multipoint", key,
                           {"layers": {n: {"key": list(k), "points": p} for n, (k, p) in layers.items()}})
        return cls(layers)

    def apply(self, strat, space: SearchSpace, point: Point, layer_key) -> None:
        """Give ``strat`` (``point``'s strategy) the points of each layer ``point`` puts at ``4+``, where the
        layer is quantized as the points were fitted (its key holds the weight bits and the input's
        quantization); a layer whose fitting gave no point stays plain."""
        for k, c in zip(space.knobs, point):
            if k.kind != "weight" or not is_multipoint(c) or k.name not in self.layers:
                continue
            op = strat.ops[k.name]
            fitted_key, points = self.layers[k.name]
            if op.mode == "integer" and tuple(layer_key(strat, k.name)) == fitted_key:
                op.multipoint = points

