"""The calibrator interface, its registry and the shared bookkeeping.

A calibrator watches the FP32 values of every quantized edge (``observe``,
many batches per edge) and then turns its statistics into clipping ranges
(``thresholds``). Statistics are streaming and O(bins) per edge, so the
calibration set can be any size. Each method is one file and one class,
registered by ``@register("name")``; the key is also the CLI name and the
file name (``kl`` -> ``calibrate/kl.py`` -> ``KLCalibrator``).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hago.calibrate.histogram import RunningMinMax, StreamingHistogram
from hago.errors import CalibrationError
from hago.plugins import registrar

logger = logging.getLogger(__name__)

#: Half-width given to an edge that is exactly zero everywhere, so its scale is > 0.
ZERO_RANGE_EPS = 1e-6
_MIN_BITS, _MAX_BITS = 2, 32


@dataclass(frozen=True)
class Range:
    """A clipping range ``[lo, hi]`` for one edge.

    The calibrator does not force ``lo <= 0 <= hi``: the realize step widens
    the range to contain 0 (so zero padding is exact); :meth:`with_zero` does it.
    """

    lo: float
    hi: float

    def __post_init__(self) -> None:
        # Plain floats, so a Range serializes to JSON and compares predictably.
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo <= self.hi):
            raise CalibrationError(f"invalid range [{self.lo}, {self.hi}]: need finite lo <= hi")

    def with_zero(self) -> Range:
        """The smallest range holding both this one and 0."""
        return Range(min(self.lo, 0.0), max(self.hi, 0.0))


class CalibratorConfig(BaseModel):
    """Base of the typed options: frozen, unknown keys and wrong types rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class HistogramConfig(CalibratorConfig):
    """Options shared by the histogram methods."""

    bins: int = Field(2048, ge=16, le=1 << 20, description="histogram bins per edge")


Stats = RunningMinMax  # StreamingHistogram is a RunningMinMax too


class Calibrator(ABC):
    """Streaming per-edge statistics in, one :class:`Range` per edge out.

    Subclasses set ``config_class`` and implement :meth:`_range`; the base
    class validates inputs, keeps the statistics, resolves per-edge bits and
    symmetry, and guarantees every returned range has non-zero width.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[CalibratorConfig]] = CalibratorConfig

    def __init__(self, config: CalibratorConfig | None = None) -> None:
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise CalibrationError(
                f"calibrator {self.name!r} takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        self._stats: dict[str, Stats] = {}

    # -- statistics ------------------------------------------------------------
    def _new_stats(self, name: str) -> Stats:
        return RunningMinMax(name)

    def observe(self, name: str, values: np.ndarray) -> None:
        """Add one batch of edge ``name``'s FP32 values; raises on NaN/inf naming the edge."""
        stats = self._stats.get(name)
        if stats is None:
            stats = self._stats[name] = self._new_stats(name)
        stats.update(values)

    @property
    def names(self) -> list[str]:
        """Edges observed so far, in first-seen order."""
        return list(self._stats)

    def stats(self, name: str) -> Stats:
        """The running statistics of one edge (a :class:`StreamingHistogram` for histogram methods)."""
        if name not in self._stats:
            raise CalibrationError(f"edge {name!r} was never observed; observed: {self._listed()}")
        return self._stats[name]

    def _listed(self) -> str:
        names = self.names
        shown = ", ".join(repr(n) for n in names[:8])
        return shown + (f", ... ({len(names)} in all)" if len(names) > 8 else "") or "none"

    # -- thresholds ------------------------------------------------------------
    def thresholds(
        self,
        bits: int | Mapping[str, int] = 8,
        symmetric: bool | Mapping[str, bool] = False,
        names: Iterable[str] | None = None,
    ) -> dict[str, Range]:
        """One clipping range per observed edge.

        Parameters
        ----------
        bits:
            Bit width for all edges, or a mapping edge -> bits (edges it omits get 8).
        symmetric:
            ``True`` gives ``Range(-T, T)``; a mapping sets it per edge (omitted: False).
        names:
            Only these edges (all observed edges when None): the search observes
            every edge once and asks for the few each candidate quantizes.

        A mapping that names an edge never observed, or an edge observed only
        with empty batches, raises :class:`CalibrationError`.
        """
        if not self._stats:
            raise CalibrationError(
                f"no calibration statistics: call observe() on calibrator {self.name!r} "
                "with at least one batch before thresholds()"
            )
        for mapping in (bits, symmetric):
            if isinstance(mapping, Mapping):
                unknown = [k for k in mapping if k not in self._stats]
                if unknown:
                    raise CalibrationError(
                        f"edge {unknown[0]!r} was never observed; observed: {self._listed()}"
                    )
        wanted = list(self._stats) if names is None else list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in self._stats]
        if unknown:
            raise CalibrationError(f"edge {unknown[0]!r} was never observed; observed: {self._listed()}")
        empty = [n for n in wanted if self._stats[n].count == 0]
        if empty:
            raise CalibrationError(
                f"edge {empty[0]!r} was observed with zero elements ({len(empty)} such edges); "
                "feed calibration batches with data"
            )
        out = {}
        for name in wanted:
            stats = self._stats[name]
            b = _resolve_bits(bits, name)
            sym = _resolve_symmetric(symmetric, name)
            rng = _nonzero_width(self._range(stats, b, sym), sym)
            logger.debug("%s: edge %s bits=%d symmetric=%s -> %s", self.name, name, b, sym, rng)
            out[name] = rng
        return out

    @abstractmethod
    def _range(self, stats: Stats, bits: int, symmetric: bool) -> Range:
        """The method's range for one edge with ``count > 0``."""

    # -- persistence -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (numbers, numpy arrays) to resume calibration later."""
        return {
            "calibrator": self.name,
            "config": self.config.model_dump(),
            "edges": {n: s.state_dict() for n, s in self._stats.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the statistics by a :meth:`state_dict` of the same method and options."""
        if state.get("calibrator") != self.name or state.get("config") != self.config.model_dump():
            raise CalibrationError(
                f"saved state is for calibrator {state.get('calibrator')!r} with options "
                f"{state.get('config')}; this one is {self.name!r} with {self.config.model_dump()}"
            )
        self._stats = {}
        for name, edge_state in state["edges"].items():
            stats = self._stats[name] = self._new_stats(name)
            stats.load_state_dict(edge_state)


class HistogramCalibrator(Calibrator):
    """A calibrator whose per-edge statistics are a :class:`StreamingHistogram`."""

    config_class: ClassVar[type[CalibratorConfig]] = HistogramConfig
    config: HistogramConfig

    def _new_stats(self, name: str) -> StreamingHistogram:
        return StreamingHistogram(self.config.bins, name)

    def stats(self, name: str) -> StreamingHistogram:
        stats = super().stats(name)
        assert isinstance(stats, StreamingHistogram)
        return stats


def _resolve_bits(bits: int | Mapping[str, int], name: str) -> int:
    b = bits.get(name, 8) if isinstance(bits, Mapping) else bits
    if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)):
        raise CalibrationError(f"edge {name!r}: bits={b!r}; pass an integer")
    if not _MIN_BITS <= b <= _MAX_BITS:
        raise CalibrationError(f"edge {name!r}: bits={b}; use {_MIN_BITS} to {_MAX_BITS}")
    return int(b)


def _resolve_symmetric(symmetric: bool | Mapping[str, bool], name: str) -> bool:
    sym = symmetric.get(name, False) if isinstance(symmetric, Mapping) else symmetric
    if not isinstance(sym, (bool, np.bool_)):
        raise CalibrationError(f"edge {name!r}: symmetric={sym!r}; pass True or False")
    return bool(sym)


def _nonzero_width(rng: Range, symmetric: bool) -> Range:
    """Never hand out a zero-width range: a constant edge would get scale 0.

    A constant ``c`` widens to include 0 (``[0, c]`` or ``[c, 0]``, or
    ``[-|c|, |c|]`` when symmetric); an all-zero edge gets ``ZERO_RANGE_EPS``.
    """
    if rng.hi > rng.lo:
        return rng
    if symmetric:
        t = max(abs(rng.lo), abs(rng.hi)) or ZERO_RANGE_EPS
        return Range(-t, t)
    wide = rng.with_zero()
    return wide if wide.hi > wide.lo else Range(0.0, ZERO_RANGE_EPS)


# -- registry --------------------------------------------------------------------
CALIBRATORS: dict[str, type[Calibrator]] = {}


#: Class decorator: ``@register("mse")`` adds a calibrator to :data:`CALIBRATORS` under that name.
register = registrar(CALIBRATORS, "calibrator", CalibrationError)


def get_calibrator(name: str, **options: Any) -> Calibrator:
    """Build the calibrator registered as ``name`` with typed ``options``.

    Unknown names and unknown or ill-typed options raise a one-line
    :class:`CalibrationError` that lists what is valid.
    """
    cls = CALIBRATORS.get(name)
    if cls is None:
        raise CalibrationError(
            f"unknown calibrator {name!r}; valid: {', '.join(sorted(CALIBRATORS))}"
        )
    try:
        config = cls.config_class(**options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        valid = ", ".join(cls.config_class.model_fields) or "none"
        raise CalibrationError(
            f"bad option for calibrator {name!r}: {problems} (valid options: {valid})"
        ) from None
    return cls(config)
