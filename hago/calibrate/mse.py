"""mse: the clipping range with the least expected squared quantization error.

Shrinking the range trades clipping error (values beyond it) for rounding
error (a smaller step).  The optimum depends on the bit width: few bits want
a tight clip (Banner et al., "Post-training 4-bit quantization", 2019;
Nagel et al., "A White Paper on Neural Network Quantization", 2021, sec. 3.4).

The error is computed from the histogram, not from stored data.  Within each
bin the values are taken as uniformly spread, and the error integral of the
quantizer ``x -> clip(s * round(x / s), L, U)`` has a closed form
(:func:`_cum_error`), so a candidate costs O(bins), exact up to that
within-bin assumption.  That is better than the usual "rounding noise is
``s**2/12``" model when bins are coarse, and the histogram's count of exact
zeros (post-ReLU) is charged nothing, as on the device.

Quantizer model (what realize is expected to do with the range):

* symmetric: ``s = T / (2**(bits-1) - 1)``, grid ``-T .. T``;
* asymmetric: the range widened to hold 0, ``s = (hi - lo) / (2**bits - 1)``,
  integer zero point ``round(-lo / s)``, so 0 is on the grid.

Search: a grid of ``candidates`` thresholds ``k/candidates * max|x|``
(symmetric), or of each end ``k/candidates * min`` / ``* max`` (asymmetric);
a mixed-sign asymmetric edge alternates between the two ends ``rounds`` times
(coordinate descent; clipping error separates by end, so it converges fast).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from hago.calibrate.base import (
    CalibratorConfig,
    HistogramCalibrator,
    HistogramConfig,
    Range,
    Stats,
    register,
)
from hago.calibrate.histogram import StreamingHistogram

class MSEConfig(HistogramConfig):
    """``candidates`` thresholds per search axis; ``rounds`` of coordinate descent."""

    candidates: int = Field(200, ge=10, le=10000)
    rounds: int = Field(2, ge=1, le=20)


def _cum_error(x: np.ndarray, s: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``E(x) = integral from 0 to x`` of the squared error of the quantizer.

    Inside ``[lo, hi]`` (grid points, ``lo <= 0 <= hi``) the error is the
    sawtooth ``t - s*round(t/s)``; with ``u = x/s``, ``n = round(u)``,
    ``r = u - n`` its integral is ``s**3 * (n/12 + r**3/3)`` (each full step
    contributes ``s**3/12``).  Beyond an end the value clamps to it, adding
    ``(x - hi)**3 / 3`` above and subtracting ``(lo - x)**3 / 3`` below.
    ``x`` broadcasts against the per-candidate ``s``, ``lo``, ``hi``.
    """
    u = np.clip(x, lo, hi) / s
    n = np.round(u)
    r = u - n
    inner = s**3 * (n / 12.0 + r**3 / 3.0)
    return inner + np.maximum(x - hi, 0.0) ** 3 / 3.0 - np.maximum(lo - x, 0.0) ** 3 / 3.0


def expected_sq_error(
    edges: np.ndarray,
    counts: np.ndarray,
    s: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    zeros: int = 0,
) -> np.ndarray:
    """Total squared error of histogrammed data, one value per candidate quantizer.

    ``zeros`` of the values in the bin holding 0 are exactly 0: every
    candidate grid holds 0, so they cost nothing and leave that bin.
    """
    s, lo, hi = (np.asarray(a, dtype=np.float64).reshape(-1, 1) for a in (s, lo, hi))
    if zeros:
        counts = counts.copy()
        counts[int(np.searchsorted(edges, 0.0, side="right")) - 1] -= zeros
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return np.zeros(s.shape[0])
    first, last = int(nz[0]), int(nz[-1]) + 1  # the occupied bins; E once per edge
    x = edges[first : last + 1]
    per_bin = np.diff(_cum_error(x, s, lo, hi), axis=1) / np.diff(x)
    return per_bin @ counts[first:last].astype(np.float64)


def symmetric_grid(t: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step and grid ends of the symmetric quantizer with threshold ``t``."""
    s = t / (2 ** (bits - 1) - 1)
    return s, -t, t


def asymmetric_grid(
    lo: np.ndarray, hi: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step and grid ends of the zero-point quantizer for ranges ``[lo, hi]``."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    levels = 2**bits - 1
    s = (hi - lo) / levels
    zero_point = np.clip(np.round(-lo / s), 0, levels)
    return s, -zero_point * s, (levels - zero_point) * s


@register("mse")
class MSECalibrator(HistogramCalibrator):
    """Grid search for the range with the least expected squared quantization error."""

    config_class: ClassVar[type[CalibratorConfig]] = MSEConfig
    config: MSEConfig

    def _range(self, stats: Stats, bits: int, symmetric: bool) -> Range:
        assert isinstance(stats, StreamingHistogram)
        edges, counts = stats.edges, stats.counts
        zeros = stats.zeros
        fractions = np.arange(1, self.config.candidates + 1) / self.config.candidates
        if symmetric:
            maxabs = max(abs(stats.min), abs(stats.max))
            if maxabs == 0.0:
                return Range(0.0, 0.0)
            ts = fractions * maxabs
            errors = expected_sq_error(edges, counts, *symmetric_grid(ts, bits), zeros)
            t = float(ts[int(np.argmin(errors))])
            return Range(-t, t)
        lo, hi = stats.min, stats.max
        search_hi, search_lo = hi > 0, lo < 0
        for _ in range(self.config.rounds if (search_hi and search_lo) else 1):
            if search_hi:
                hi = self._best_end(edges, counts, zeros, bits, np.full_like(fractions, lo),
                                    fractions * stats.max, pick="hi")
            if search_lo:
                lo = self._best_end(edges, counts, zeros, bits, fractions * stats.min,
                                    np.full_like(fractions, hi), pick="lo")
        # One-signed data: the fixed end is the observed extreme; a clip past it wins.
        return Range(min(lo, hi), hi) if search_hi else Range(lo, max(lo, hi))

    @staticmethod
    def _best_end(
        edges: np.ndarray,
        counts: np.ndarray,
        zeros: int,
        bits: int,
        los: np.ndarray,
        his: np.ndarray,
        pick: str,
    ) -> float:
        """The end (``pick``) of the candidate ``[los[k], his[k]]`` with the least error."""
        errors = expected_sq_error(edges, counts, *asymmetric_grid(los, his, bits), zeros)
        best = int(np.argmin(errors))
        return float(his[best] if pick == "hi" else los[best])
