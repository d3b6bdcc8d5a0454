"""Lp-optimal clipping of one edge, from its calibration histogram (LAPQ's initialisation).

LAPQ (Nahshan et al., "Loss Aware Post-training Quantization", 2021) starts
from the clip that minimises ``E|x - Q(x)|^p`` per tensor, for several ``p``:
larger ``p`` punishes the big (clipping) errors more and so clips less.

hago's activation edges are asymmetric (a zero point) or symmetric, and the
observed range ``[lo, hi]`` of an edge need not hold 0 at either end. One
parameter per edge spans both cases: the *shrink* ``alpha`` in ``(0, 1]``
clips to ``[alpha * lo, alpha * hi]`` (symmetric: ``+-alpha * max|x|``).
Shrinking both ends by the same factor leaves ``-lo / scale`` and so the
zero point unchanged (up to its rounding): only the step changes, the grid
stays anchored at the same code for 0. A post-ReLU edge (``lo = 0``) is the
usual one-sided clip of ``hi``.

The error is summed over the histogram's bin centres weighted by their
counts (2048 bins: about a hundred per 4-bit step), and the histogram's
exact zeros cost nothing, since 0 is on every candidate grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hago.calibrate.histogram import StreamingHistogram
from hago.qparams import QParams, activation_qparams


def shrunk_qparams(lo: float, hi: float, alpha: float, dtype: str, bits: int, symmetric: bool) -> QParams:
    """The edge's parameters for the observed range ``[lo, hi]`` shrunk by ``alpha``."""
    if symmetric:
        t = alpha * max(abs(lo), abs(hi))
        return activation_qparams(-t, t, dtype, bits, True)
    return activation_qparams(alpha * lo, alpha * hi, dtype, bits, False)


def shrunk_range(lo: float, hi: float, alpha: float, symmetric: bool) -> tuple[float, float]:
    """The clipping range ``shrunk_qparams`` quantizes with (what ``EdgeChoice.range`` records)."""
    if symmetric:
        t = alpha * max(abs(lo), abs(hi))
        return -t, t
    return alpha * lo, alpha * hi


def _centres(hist: StreamingHistogram) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres and counts of the occupied bins, exact zeros taken out of their bin."""
    edges, counts = hist.edges, hist.counts.astype(np.float64)
    if hist.zeros:
        counts = counts.copy()
        counts[int(np.searchsorted(edges, 0.0, side="right")) - 1] -= hist.zeros
    nz = np.flatnonzero(counts > 0)
    return 0.5 * (edges[nz] + edges[nz + 1]), counts[nz]


def lp_alphas(hist: StreamingHistogram, dtype: str, bits: int, symmetric: bool, ps: Sequence[float],
              candidates: int = 100) -> np.ndarray:
    """For each ``p`` in ``ps``, the shrink ``alpha`` with the least ``sum |x - Q(x)|^p`` (``[len(ps)]``).

    A 1-D grid search over ``alpha = k / candidates``, ``k = 1..candidates``,
    each candidate quantized exactly as realize will (:func:`shrunk_qparams`).
    """
    x, w = _centres(hist)
    if x.size == 0 or max(abs(hist.min), abs(hist.max)) == 0.0:
        return np.ones(len(ps))
    alphas = np.arange(1, candidates + 1) / candidates
    qps = [shrunk_qparams(hist.min, hist.max, a, dtype, bits, symmetric) for a in alphas]
    s = np.array([float(q.scale) for q in qps])[:, None]
    zp = np.array([float(q.zero_point) for q in qps])[:, None]
    qmin, qmax = qps[0].qmin, qps[0].qmax
    err = np.abs(x[None, :] - (np.clip(np.round(x[None, :] / s) + zp, qmin, qmax) - zp) * s)  # [K, B]
    err = err / max(float(err.max()), 1e-30)  # |e|^4 of tiny errors underflows nothing this way
    return np.array([alphas[int(np.argmin((err ** p) @ w))] for p in ps])
