"""percentile: clip a fixed fraction of the tails.

Cheap robustness against outliers (used by TensorRT and ONNX Runtime's
``Percentile`` method): the range ends at the ``percentile``-th and
``100 - percentile``-th percentiles, read from the streaming histogram to
within one bin width.  Symmetric edges use the percentile of ``|x|``, read
from the exactly folded histogram of ``|x|``.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from hago.calibrate.base import (
    CalibratorConfig,
    HistogramCalibrator,
    HistogramConfig,
    Range,
    Stats,
    register,
)
from hago.calibrate.histogram import StreamingHistogram, histogram_quantile


class PercentileConfig(HistogramConfig):
    """``percentile`` in (50, 100]: 99.99 keeps all but 1 value in 10,000 per tail."""

    percentile: float = Field(99.99, gt=50.0, le=100.0)


@register("percentile")
class PercentileCalibrator(HistogramCalibrator):
    """Range at the given percentiles of the observed values, clipped to min/max."""

    config_class: ClassVar[type[CalibratorConfig]] = PercentileConfig
    config: PercentileConfig

    def _range(self, stats: Stats, bits: int, symmetric: bool) -> Range:
        assert isinstance(stats, StreamingHistogram)
        p = self.config.percentile
        maxabs = max(abs(stats.min), abs(stats.max))
        if p == 100.0:  # exact, not interpolated: the 100th percentile is the max
            return Range(-maxabs, maxabs) if symmetric else Range(stats.min, stats.max)
        if symmetric:
            edges, counts = stats.abs_histogram()
            t = min(histogram_quantile(edges, counts, p), maxabs)
            return Range(-t, t)
        edges, counts = stats.edges, stats.counts
        lo, hi = (
            min(max(histogram_quantile(edges, counts, q), stats.min), stats.max)
            for q in (100.0 - p, p)
        )
        return Range(min(lo, hi), max(lo, hi))
