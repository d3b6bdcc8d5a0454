"""Calibration: streaming per-edge statistics -> clipping ranges (pure numpy).

``get_calibrator("kl").observe(name, batch)`` for every batch and edge, then
``.thresholds(bits, symmetric)`` gives one :class:`Range` per edge.  Methods
register themselves in :data:`CALIBRATORS` on import:

* ``minmax`` -- the observed range (:mod:`hago.calibrate.minmax`);
* ``percentile`` -- tails clipped at a percentile (:mod:`hago.calibrate.percentile`);
* ``kl`` -- TensorRT entropy calibration (:mod:`hago.calibrate.kl`);
* ``mse`` -- least expected squared quantization error (:mod:`hago.calibrate.mse`).
"""

from hago.calibrate.base import (
    CALIBRATORS,
    ZERO_RANGE_EPS,
    Calibrator,
    CalibratorConfig,
    HistogramCalibrator,
    HistogramConfig,
    Range,
    get_calibrator,
    register,
)
from hago.calibrate.histogram import RunningMinMax, StreamingHistogram, histogram_quantile
from hago.calibrate.kl import KLCalibrator, KLConfig
from hago.calibrate.minmax import MinMaxCalibrator, MinMaxConfig
from hago.calibrate.mse import MSECalibrator, MSEConfig
from hago.calibrate.percentile import PercentileCalibrator, PercentileConfig

__all__ = [
    "CALIBRATORS",
    "ZERO_RANGE_EPS",
    "Calibrator",
    "CalibratorConfig",
    "HistogramCalibrator",
    "HistogramConfig",
    "KLCalibrator",
    "KLConfig",
    "MSECalibrator",
    "MSEConfig",
    "MinMaxCalibrator",
    "MinMaxConfig",
    "PercentileCalibrator",
    "PercentileConfig",
    "Range",
    "RunningMinMax",
    "StreamingHistogram",
    "get_calibrator",
    "histogram_quantile",
    "register",
]
