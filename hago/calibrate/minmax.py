"""minmax: the observed range, no clipping.

The baseline every other method is compared with: no value is ever clipped,
so one outlier stretches the scale for the whole tensor.  Needs only
min/max/count per edge, no histogram.
"""

from __future__ import annotations

from typing import ClassVar

from hago.calibrate.base import Calibrator, CalibratorConfig, Range, Stats, register


class MinMaxConfig(CalibratorConfig):
    """minmax has no options; the class exists so unknown options are rejected."""


@register("minmax")
class MinMaxCalibrator(Calibrator):
    """``Range(min, max)``, or ``Range(-max|x|, max|x|)`` when symmetric."""

    config_class: ClassVar[type[CalibratorConfig]] = MinMaxConfig
    config: MinMaxConfig

    def _range(self, stats: Stats, bits: int, symmetric: bool) -> Range:
        if symmetric:
            t = max(abs(stats.min), abs(stats.max))
            return Range(-t, t)
        return Range(stats.min, stats.max)
