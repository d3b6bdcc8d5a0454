"""exp, sigmoid and SiLU as float32 TIR expressions that vectorize (no libm call per lane).

LLVM lowers ``exp`` to one scalar ``expf`` call per vector lane, which made
SiLU's sigmoid the largest kernel of EfficientNet-B0's FP32 build. These are
the classic Cephes single-precision polynomial (the one TOPI's ``fast_exp``
uses): ``x = n ln2 + r`` with ``|r| <= ln2 / 2``, a degree-7 polynomial for
``exp(r)``, and ``2**n`` built in the exponent bits; ~1e-7 relative error.

Written as expressions, not TE tensors, so one definition serves both the
float build's legalization (:func:`hago.lower.fast_math_legalizations`) and
the integer kernels' write-back (:mod:`hago.backends.x86.epilogue`): a SiLU
applied on a conv's register tile is the same arithmetic as the float op.
"""

from __future__ import annotations

from tvm import tirx

_COEFFS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _f32(v: float):
    return tirx.const(v, "float32")


def exp(x):
    """``e**x`` for a float32 expression (0 below -88.37, inf above 88.37, as ``expf``)."""
    x = tirx.max(tirx.min(x, _f32(88.3762626647950)), _f32(-88.3762626647949))
    n = tirx.floor(x * _f32(1.44269504088896341) + _f32(0.5))
    r = x - n * _f32(0.6931471805599453)
    p = _f32(_COEFFS[0])
    for c in _COEFFS[1:]:
        p = p * r + _f32(c)
    y = p * r * r + r + _f32(1.0)
    two_n = tirx.reinterpret("float32", tirx.shift_left((n + _f32(127.0)).astype("int32"), tirx.const(23, "int32")))
    return two_n * y


def sigmoid(x):
    """``1 / (1 + e**-x)`` for a float32 expression."""
    one = _f32(1.0)
    return one / (one + exp(-x))


def silu(x):
    """``x * sigmoid(x)`` (SiLU, Swish) for a float32 expression."""
    return x * sigmoid(x)
