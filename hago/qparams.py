"""Quantization parameters: from a calibrated range to scale, zero point and
fixed-point multipliers.

This is the arithmetic every realized integer kernel relies on, kept in numpy
and free of TVM so it can be checked against an independent reference.

Conventions (the same as TFLite/gemmlowp and ONNX Runtime):

* real = scale * (q - zero_point); ranges are widened to include 0 so that a
  real 0 (padding, ReLU floor) is exactly representable;
* weights are symmetric and narrow-range (-127..127 at 8 bits) so that the
  zero point is 0 and ``-128`` never appears (keeps u8 x s8 sums safe);
* a requantize scale ``s_in * s_w / s_out`` is applied as an int32 multiplier
  in [2^30, 2^31) and a right shift, rounding half away from zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import QuantizeError

_INT_RANGES = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int16": (-32768, 32767),
    "int32": (-(2**31), 2**31 - 1),
}

#: Relax has no 4-bit tensors: 4-bit values are carried in 8-bit containers.
CONTAINER = {"int4": "int8", "uint4": "uint8"}


def container_dtype(dtype: str) -> str:
    """The dtype a value of ``dtype`` is stored in inside a Relax program."""
    return CONTAINER.get(dtype, dtype)


def integer_range(dtype: str, bits: int | None = None, narrow: bool = False) -> tuple[int, int]:
    """Representable [qmin, qmax] of ``dtype`` restricted to ``bits`` bits.

    ``bits`` lower than the container's width models 4-bit values in an 8-bit
    container and AVX2's 7-bit "reduce_range" weights. ``narrow`` drops the most
    negative code so a symmetric range is exactly mirrored.
    """
    if dtype not in _INT_RANGES:
        raise QuantizeError(f"dtype {dtype!r} is not an integer dtype hago can quantize to")
    lo, hi = _INT_RANGES[dtype]
    if bits is not None:
        if dtype.startswith("u"):
            lo, hi = 0, 2**bits - 1
        else:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if narrow and lo < 0:
        lo = -hi
    return lo, hi


@dataclass(frozen=True)
class QParams:
    """Affine quantization of one tensor: ``real = scale * (q - zero_point)``.

    ``scale`` and ``zero_point`` are scalars (per-tensor) or 1-D arrays along
    ``axis`` (per-channel).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    qmin: int
    qmax: int
    axis: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def to_json(self) -> dict:
        return {
            "scale": np.asarray(self.scale, np.float64).tolist(),
            "zero_point": np.asarray(self.zero_point, np.int64).tolist(),
            "dtype": self.dtype,
            "qmin": self.qmin,
            "qmax": self.qmax,
            "axis": self.axis,
        }

    @classmethod
    def from_json(cls, d: dict) -> "QParams":
        return cls(
            scale=np.asarray(d["scale"], np.float32),
            zero_point=np.asarray(d["zero_point"], np.int32),
            dtype=d["dtype"],
            qmin=int(d["qmin"]),
            qmax=int(d["qmax"]),
            axis=d.get("axis"),
        )


def activation_qparams(lo: float, hi: float, dtype: str, bits: int, symmetric: bool) -> QParams:
    """Per-tensor parameters for an activation whose calibrated range is [lo, hi].

    The range is widened to contain 0 (exact zero padding and ReLU floors). A
    symmetric scheme on an unsigned dtype centres the zero point (128 at 8 bits),
    which is how a signed tensor is shifted into VNNI's unsigned operand.
    """
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise QuantizeError(f"calibrated range [{lo}, {hi}] is not finite")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = integer_range(dtype, bits)
    if symmetric:
        t = max(abs(lo), abs(hi)) or 1e-8
        if dtype.startswith("u"):
            zp = (qmax + 1) // 2
            scale = t / (qmax - zp)
        else:
            zp = 0
            scale = t / qmax
    else:
        if hi - lo <= 0:
            hi = lo + 1e-8
        scale = (hi - lo) / (qmax - qmin)
        zp = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    return QParams(np.float32(scale), np.int32(zp), dtype, qmin, qmax, None)


def weight_qparams(w: np.ndarray, axis: int | None, bits: int, dtype: str = "int8",
                   min_scale: np.ndarray | float | None = None) -> QParams:
    """Symmetric, narrow-range weight parameters, per channel along ``axis`` or per tensor.

    ``min_scale`` floors the scale (see :func:`bias_scale_floor`): a channel
    whose weights are all but zero would otherwise get a scale so small that
    its bias no longer fits the int32 accumulator.
    """
    qmin, qmax = integer_range(dtype, bits, narrow=True)
    if axis is None:
        amax = np.asarray(np.abs(w).max(), np.float64)
    else:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red).astype(np.float64)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    if min_scale is not None:
        scale = np.maximum(scale, np.asarray(min_scale, np.float64))
    scale = scale.astype(np.float32)
    zp = np.zeros_like(scale, dtype=np.int32)
    return QParams(scale, zp, dtype, qmin, qmax, axis)


def fixed_weight_qparams(scale: np.ndarray, axis: int, bits: int, dtype: str = "int8") -> QParams:
    """Symmetric, narrow-range per-channel weight parameters with a given step per channel."""
    qmin, qmax = integer_range(dtype, bits, narrow=True)
    s = np.asarray(scale, np.float32)
    return QParams(s, np.zeros_like(s, dtype=np.int32), dtype, qmin, qmax, axis)


#: Headroom the int32 accumulator keeps for the bias: |bias_q| <= 2**30 leaves
#: 2**30 for the products and the zero-point term.
BIAS_BITS = 30


def bias_scale_floor(bias: np.ndarray | None, input_scale: float) -> np.ndarray | None:
    """The smallest per-channel weight scale at which ``bias / (s_x * s_w)`` fits in 2**30.

    Batch-norm folding leaves "dead" channels (EfficientNet-Lite0: |w| ~ 3e-9,
    bias ~ -1.2) whose max-abs scale would put the quantized bias far past
    int32. Flooring the scale costs those channels nothing: their weights
    round to 0 either way and the bias carries the output.
    """
    if bias is None:
        return None
    # a hair above the exact bound, so that rounding the scale to float32 cannot cross it
    return np.abs(np.asarray(bias, np.float64)) / (float(input_scale) * 2.0**BIAS_BITS) * (1 + 2.0**-20)


def quantize_weight(w: np.ndarray, qp: QParams) -> np.ndarray:
    """Round-to-nearest weight quantization into the container dtype (int8 for int4)."""
    scale = qp.scale
    if qp.axis is not None:
        shape = [1] * w.ndim
        shape[qp.axis] = -1
        scale = scale.reshape(shape)
    q = np.clip(np.round(w.astype(np.float64) / scale), qp.qmin, qp.qmax)
    return q.astype(container_dtype(qp.dtype))


def fixed_point_multiplier(real_scale: np.ndarray, style: str = "fixed_point") -> tuple[np.ndarray, np.ndarray]:
    """Split ``real_scale`` into an int32 multiplier and a right shift.

    ``real_scale ~= multiplier * 2**-shift`` with the multiplier in
    [2^30, 2^31), so int32 accumulator x multiplier fits in int64 with room
    for the rounding term. ``style="power_of_two"`` rounds the scale to a power
    of two first (a shift-only requantize, as some DSPs want).
    """
    real = np.atleast_1d(np.asarray(real_scale, np.float64))
    if np.any(~np.isfinite(real)) or np.any(real <= 0):
        raise QuantizeError("requantize scale must be finite and positive; check the calibration ranges")
    if style == "power_of_two":
        real = np.exp2(np.round(np.log2(real)))
    mant, exp = np.frexp(real)  # real = mant * 2**exp, mant in [0.5, 1)
    mult = np.round(mant * 2.0**31).astype(np.int64)
    carry = mult == 2**31
    mult = np.where(carry, mult // 2, mult)
    exp = exp + carry
    shift = 31 - exp
    if np.any(shift < 1) or np.any(shift > 62):
        raise QuantizeError(f"requantize scale {real.max():.3g} is out of the fixed-point range")
    return mult.astype(np.int32), shift.astype(np.int32)


def requantize_reference(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``round_half_away_from_zero(acc * mult / 2**shift)`` in int64; used for bias correction checks."""
    p = acc.astype(np.int64) * mult.astype(np.int64)
    s = shift.astype(np.int64)
    mag = (np.abs(p) + (np.int64(1) << (s - 1))) >> s
    return np.where(p < 0, -mag, mag)
