"""Which sizes a model is calibrated, evaluated and built at: the rules compile and search share.

hago's integer kernels tile exact shapes, so every build is static. Two facts
of the imported graph decide the sizes:

- a **fixed batch**: a static batch the graph depends on (``hago.onnx_prep``
  could not relax it). Calibration, evaluation and the build all use it, and
  calibration data is trimmed to whole batches of it;
- **symbolic sizes other than the batch** (height, width, sequence length):
  bound to what the calibration data has, or refused in one line when there is
  no calibration data to take them from.
"""

from __future__ import annotations

import logging

from .data import Samples
from .errors import DataError
from .frontend import bind_symbolic_dims, input_infos, symbolic_dims

log = logging.getLogger(__name__)

__all__ = ["bind_calibration_dims", "whole_batches"]


def bind_calibration_dims(fp32, samples: Samples | None):
    """Bind symbolic non-batch input dims from ``samples``; ``(module, {dim: size})``."""
    left = symbolic_dims(input_infos(fp32))
    if not left:
        return fp32, {}
    if samples is None:
        raise DataError(f"model input dims {', '.join(left)} are symbolic; hago builds for fixed sizes and takes "
                        f"them from the calibration data (--calib), or re-export the model with static sizes")
    return bind_symbolic_dims(fp32, {k: v.shape for k, v in samples.arrays.items()})


def whole_batches(samples: Samples, fixed: int | None, name: str) -> Samples:
    """Drop the tail that does not fill a batch of a fixed-batch graph (a static batch > 1)."""
    if not fixed or fixed == 1:
        return samples
    n = len(samples)
    if n < fixed:
        raise DataError(f"{name} data has {n} samples but the model's static batch is {fixed}; "
                        f"give at least {fixed} samples")
    keep = n - n % fixed
    if keep < n:
        log.warning("%s data: %d samples do not fill a batch of %d and are not used", name, n - keep, fixed)
    return Samples({k: v[:keep] for k, v in samples.arrays.items()},
                   None if samples.labels is None else samples.labels[:keep])
