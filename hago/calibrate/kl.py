"""kl: entropy calibration (TensorRT; Migacz, "8-bit Inference with TensorRT", GTC 2017).

For each candidate threshold ``T`` (the right edge of |x|-histogram bin
``i - 1``, ``i`` from the number of levels up to all bins):

* ``P`` is the histogram of ``|x|`` cut to the first ``i`` bins, with every
  clipped value (``|x| >= T``) added to the last bin;
* ``Q`` is the cut histogram *without* the outliers, merged into ``levels``
  equal groups of bins (the last group takes the remainder) and spread back
  evenly over the bins that were non-zero in ``P``;
* both are smoothed (zeros get ``1e-4``, taken from the non-zeros) and
  normalised, and ``KL(P || Q)`` is computed.

The ``T`` with the smallest divergence wins. This follows MXNet's
``_get_optimal_threshold`` and TVM's old ``_find_scale_by_kl`` (the last
group spans the remainder; ONNX Runtime's ``get_entropy_threshold`` drops it
from ``Q``), on a histogram of ``|x|`` as in TensorRT.

Levels are the quantized values on one side of zero: ``2**(bits-1)`` for a
symmetric or mixed-sign edge, ``2**bits`` for an asymmetric edge whose values
all have one sign (post-ReLU). Mixed-sign asymmetric edges use the threshold
of ``|x|`` clipped to the observed min/max.  Fewer histogram bins than levels
means the histogram cannot see the quantization, so nothing is clipped.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from hago.calibrate.base import (
    CalibratorConfig,
    HistogramCalibrator,
    HistogramConfig,
    Range,
    Stats,
    register,
)
from hago.calibrate.histogram import StreamingHistogram

logger = logging.getLogger(__name__)

SMOOTH_EPS = 1e-4


class KLConfig(HistogramConfig):
    """Only the histogram size: TensorRT's 2048 bins is the default."""


def _smooth(dist: np.ndarray) -> np.ndarray | None:
    """Give empty bins ``SMOOTH_EPS``, taken evenly from the others; None if impossible."""
    zeros = dist == 0
    n_zeros = int(zeros.sum())
    n_nonzeros = dist.size - n_zeros
    if n_nonzeros == 0:
        return None
    out = dist + np.where(zeros, SMOOTH_EPS, -SMOOTH_EPS * n_zeros / n_nonzeros)
    return out if (out > 0).all() else None


def kl_divergences(counts: np.ndarray, levels: int) -> np.ndarray:
    """``KL(P_i || Q_i)`` for ``i = levels .. counts.size`` (entry ``i - levels``).

    ``counts`` is a histogram of ``|x|``; candidates whose smoothing fails
    (no mass inside, or a distribution too sparse for the epsilon) are ``inf``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.size
    outliers = np.concatenate((np.cumsum(counts[::-1])[::-1], [0.0]))  # sum(counts[i:])
    divs = np.full(max(n - levels + 1, 0), np.inf)
    for i in range(levels, n + 1):
        sliced = counts[:i]
        p = sliced.copy()
        p[-1] += outliers[i]
        nonzero = (p != 0).astype(np.float64)
        group = np.minimum(np.arange(i) // (i // levels), levels - 1)
        q_sum = np.bincount(group, weights=sliced, minlength=levels)
        q_norm = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero > 0, q_sum[group] / np.maximum(q_norm[group], 1.0), 0.0)
        ps, qs = _smooth(p), _smooth(q)
        if ps is None or qs is None:
            continue
        ps, qs = ps / ps.sum(), qs / qs.sum()
        divs[i - levels] = float(np.sum(ps * np.log(ps / qs)))
    return divs


@register("kl")
class KLCalibrator(HistogramCalibrator):
    """Threshold minimising the KL divergence between the histogram and its quantized copy."""

    config_class: ClassVar[type[CalibratorConfig]] = KLConfig
    config: KLConfig

    def _range(self, stats: Stats, bits: int, symmetric: bool) -> Range:
        assert isinstance(stats, StreamingHistogram)
        one_signed = stats.min >= 0 or stats.max <= 0
        levels = 2 ** bits if (one_signed and not symmetric) else 2 ** (bits - 1)
        maxabs = max(abs(stats.min), abs(stats.max))
        t = min(entropy_threshold(stats, levels), maxabs)
        if symmetric:
            return Range(-t, t)
        return Range(max(-t, stats.min), min(t, stats.max))


def entropy_threshold(hist: StreamingHistogram, levels: int) -> float:
    """The entropy-calibrated threshold of ``|x|`` for ``levels`` levels per side."""
    edges, counts = hist.abs_histogram()
    divs = kl_divergences(counts, levels)
    if divs.size == 0 or not np.isfinite(divs).any():
        logger.debug("kl: edge %s has %d |x| bins for %d levels; not clipping",
                     hist.name, counts.size, levels)
        return float(edges[-1])
    return float(edges[levels + int(np.argmin(divs))])
