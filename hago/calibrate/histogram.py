"""Streaming statistics for calibration, in memory independent of the data size.

Calibration sees an activation tensor one batch at a time and must never keep
the batches. :class:`RunningMinMax` keeps three numbers per edge;
:class:`StreamingHistogram` keeps a fixed number of bins whose range grows.

How the histogram grows (the choice the docs ask for)
-----------------------------------------------------
ONNX Runtime's ``HistogramCollector`` re-bins to a new range (its bin count
grows with the range) and PyTorch's ``HistogramObserver`` upsamples and
interpolates the old counts (the merge is approximate).  Here every bin lies
on a *global dyadic grid*: the bin width ``w`` is a power of two and bin ``k``
covers ``[k*w, (k+1)*w)`` for integer ``k``; the histogram holds the window
``k0 <= k < k0 + bins``.  Then:

* the bin of ``x`` is ``floor(x / w)``, and ``x / w`` is exact in floating
  point because ``w`` is a power of two;
* when a batch leaves the window, ``w`` doubles ``s`` times and old bin ``k``
  merges into new bin ``k >> s`` (``floor(k / 2**s)``), *exactly*: the merged
  counts equal a histogram of all the data over the final edges, as if it had
  been computed in one go;
* zero is always a bin edge, so folding the histogram into one of ``|x|``
  (for symmetric thresholds) is exact too.

The price: a power-of-two width wastes up to half of the bins, so the data
always spans at least ``bins / 2`` bins (the resolution of ``bins / 2``
uniform bins, at worst).  Widths never shrink: a histogram whose first batch
was wide keeps that resolution.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hago.errors import CalibrationError

# Values are binned in chunks so a 50M-element activation does not get a
# float64 copy of itself; the chunk is transient, the state stays O(bins).
_CHUNK = 1 << 20
# The smallest width relative to the magnitude of the data: keeps bin indices
# below 2**42 (far from int64 overflow) and finer than float32 resolution.
_REL_MIN_WIDTH_EXP = -40
_ABS_MIN_WIDTH = math.ldexp(1.0, -60)


def _as_numeric(values: Any, name: str) -> np.ndarray:
    """Return ``values`` as a flat real array; reject what cannot be binned."""
    arr = np.asarray(values)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise CalibrationError(
            f"edge {name!r}: calibration values have dtype {arr.dtype}; pass a real-valued array"
        )
    return arr.reshape(-1)


def _finite_min_max(arr: np.ndarray, name: str) -> tuple[float, float]:
    """Min and max of a non-empty array; NaN and inf propagate into them, so one pass checks both."""
    lo, hi = float(arr.min()), float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CalibrationError(
            f"edge {name!r}: calibration batch contains NaN or inf; check the model and its inputs"
        )
    return lo, hi


class RunningMinMax:
    """Min, max and element count of everything seen: all that minmax needs."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    def update(self, values: Any) -> None:
        arr = _as_numeric(values, self.name)
        if arr.size == 0:
            return
        lo, hi = _finite_min_max(arr, self.name)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(arr.size)

    def state_dict(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.min, self.max = float(state["min"]), float(state["max"])
        self.count = int(state["count"])


class StreamingHistogram(RunningMinMax):
    """A ``bins``-bin histogram on a dyadic grid whose range grows to fit the data.

    Parameters
    ----------
    bins:
        Number of bins; memory is ``bins`` int64 counts whatever the number of
        batches.
    name:
        The edge name, used in error messages.
    """

    def __init__(self, bins: int = 2048, name: str = "") -> None:
        super().__init__(name)
        if bins < 4:
            raise CalibrationError(f"histogram for edge {name!r}: bins={bins}; use at least 4")
        self.bins = int(bins)
        self.bin_width = 0.0  # a power of two once data arrived
        self._k0 = 0  # global index of the first bin
        self._counts = np.zeros(self.bins, dtype=np.int64)
        #: How many values were exactly 0 (post-ReLU, padding): they sit in the
        #: bin starting at 0 but quantize without error, which the MSE search uses.
        self.zeros = 0

    # -- public views -------------------------------------------------------
    @property
    def counts(self) -> np.ndarray:
        """Counts per bin (a read-only view); they sum to :attr:`count`."""
        view = self._counts.view()
        view.flags.writeable = False
        return view

    @property
    def edges(self) -> np.ndarray:
        """``bins + 1`` bin edges; exact multiples of the power-of-two width."""
        return (self._k0 + np.arange(self.bins + 1, dtype=np.float64)) * self.bin_width

    def abs_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Edges and counts of the histogram of ``|x|``, starting at 0.

        Zero is a bin edge, so signed bin ``k < 0`` (``[k*w, (k+1)*w)``) maps
        onto ``|x|`` bin ``-k-1`` exactly. The result has at most ``bins``
        bins (coarser than :attr:`bin_width` when the data sit far from 0)
        and the same total count.
        """
        k = self._k0 + np.arange(self.bins, dtype=np.int64)
        nz = self._counts > 0
        if not nz.any():
            return np.zeros(2), np.zeros(1, dtype=np.int64)
        m = np.where(k[nz] >= 0, k[nz], -k[nz] - 1)
        # Data far from zero (relative to the width) would need more than
        # ``bins`` bins from 0: merge by powers of two, exact on the dyadic grid.
        shift = 0
        while (int(m.max()) >> shift) + 1 > self.bins:
            shift += 1
        m = m >> shift
        counts = np.zeros(int(m.max()) + 1, dtype=np.int64)
        np.add.at(counts, m, self._counts[nz])
        edges = np.arange(counts.size + 1, dtype=np.float64) * math.ldexp(self.bin_width, shift)
        return edges, counts

    # -- updating ------------------------------------------------------------
    def update(self, values: Any) -> None:
        """Add one batch: widen the window if needed, then bin the batch."""
        arr = _as_numeric(values, self.name)
        if arr.size == 0:
            return
        lo, hi = _finite_min_max(arr, self.name)
        new_min, new_max = min(self.min, lo), max(self.max, hi)
        if self.count == 0:
            self._start(new_min, new_max)
        else:
            self._grow(new_min, new_max)
        self.min, self.max = new_min, new_max
        self.count += int(arr.size)
        inv_w = 1.0 / self.bin_width  # exact: the width is a power of two
        for start in range(0, arr.size, _CHUNK):
            chunk = arr[start : start + _CHUNK].astype(np.float64)
            idx = np.floor(chunk * inv_w).astype(np.int64) - self._k0
            self._counts += np.bincount(idx, minlength=self.bins)[: self.bins]
            self.zeros += int(np.count_nonzero(chunk == 0.0))

    def _span(self, lo: float, hi: float, width: float) -> tuple[int, int]:
        return math.floor(lo / width), math.floor(hi / width)

    def _start(self, lo: float, hi: float) -> None:
        """Pick the first width: the smallest power of two whose window holds [lo, hi]."""
        maxabs = max(abs(lo), abs(hi))
        floor_w = math.ldexp(1.0, math.frexp(maxabs)[1] + _REL_MIN_WIDTH_EXP) if maxabs else 0.0
        width = max(floor_w, _ABS_MIN_WIDTH)
        if hi > lo:
            width = max(width, math.ldexp(1.0, math.frexp((hi - lo) / (self.bins - 1))[1]))
        while True:
            klo, khi = self._span(lo, hi, width)
            if khi - klo + 1 <= self.bins:
                break
            width *= 2.0
        self.bin_width = width
        self._k0 = self._centred_k0(klo, khi)

    def _centred_k0(self, klo: int, khi: int) -> int:
        # Centre the data so growth on either side costs doublings equally.
        return klo - (self.bins - (khi - klo + 1)) // 2

    def _grow(self, lo: float, hi: float) -> None:
        """Double the width until [lo, hi] fits, merging old bins ``k -> k >> s`` exactly."""
        klo, khi = self._span(lo, hi, self.bin_width)
        if klo >= self._k0 and khi < self._k0 + self.bins:
            return
        shift = max(1, math.ceil(math.log2((khi - klo + 1) / self.bins)))
        while True:
            width = math.ldexp(self.bin_width, shift)
            nlo, nhi = self._span(lo, hi, width)
            if nhi - nlo + 1 <= self.bins:
                break
            shift += 1
        k0 = self._centred_k0(nlo, nhi)
        old_k = self._k0 + np.arange(self.bins, dtype=np.int64)
        nz = self._counts > 0
        merged = np.zeros(self.bins, dtype=np.int64)
        # Arithmetic right shift is floor division by 2**shift, negatives included.
        np.add.at(merged, (old_k[nz] >> shift) - k0, self._counts[nz])
        self._counts, self._k0, self.bin_width = merged, k0, width

    # -- persistence ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            bins=self.bins,
            bin_width=self.bin_width,
            k0=self._k0,
            counts=self._counts.copy(),
            zeros=self.zeros,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = np.asarray(state["counts"], dtype=np.int64)
        if counts.shape != (self.bins,) or int(state["bins"]) != self.bins:
            raise CalibrationError(
                f"histogram for edge {self.name!r}: saved state has {counts.size} bins, "
                f"this calibrator uses {self.bins}; use the same bins option"
            )
        super().load_state_dict(state)
        self.bin_width, self._k0, self._counts = float(state["bin_width"]), int(state["k0"]), counts
        self.zeros = int(state["zeros"])


def histogram_quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0..100) of histogrammed data, as ``np.percentile`` defines it.

    ``np.percentile`` (linear method) interpolates between the sorted
    elements of rank ``floor(r)`` and ``ceil(r)``, ``r = (n - 1) * q / 100``.
    The element of rank ``i`` lies in the bin ``j`` with
    ``cum[j] <= i < cum[j + 1]``; placing it inside that bin (the bin's
    elements evenly spread) is off by less than one bin width, and so is the
    interpolation between two such estimates, even across empty bins.
    """
    cum = np.concatenate(([0], np.cumsum(counts)))
    rank = (int(cum[-1]) - 1) * q / 100.0

    def order_stat(i: int) -> float:
        j = min(int(np.searchsorted(cum[1:], i, side="right")), counts.size - 1)
        frac = (i - cum[j] + 0.5) / max(int(counts[j]), 1)
        return float(edges[j] + min(frac, 1.0) * (edges[j + 1] - edges[j]))

    lo_rank = math.floor(rank)
    lo = order_stat(lo_rank)
    return lo + (rank - lo_rank) * (order_stat(min(lo_rank + 1, int(cum[-1]) - 1)) - lo)
