"""A fixed-point requantize fused into a kernel's write-back.

``realize`` requantizes an int32 accumulator as

    p   = int64(acc + bias) * multiplier[c]
    mag = (|p| + 2**(shift[c] - 1)) >> shift[c]         (round half away from zero)
    y   = clip((p < 0 ? -mag : mag) + zero_point, qmin, qmax)  -> uint8 / int8

in element-wise Relax ops, which cost a full int32 pass after the kernel. A
kernel that takes a :class:`~hago.backends.base.Requant` computes exactly the same expression on its
register tile instead and writes 8-bit outputs: bit-identical, a quarter of
the bytes, one pass fewer.
"""

from __future__ import annotations

from tvm import te, tirx

from ... import fast_math
from ..base import Requant  # the constants realize hands a kernel (bias, multiplier, shift, zero point, clip)


def requant_expr(acc_value, c, bias, mult, half, shift, rq: Requant):
    """The requantized 8-bit value of the int32 ``acc_value`` of output channel ``c`` (TE expression).

    ``bias, mult, half, shift``: :meth:`Requant.constants`; for a float
    requantize (``rq.scale``) ``mult`` holds the float32 scale and ``half``,
    ``shift`` are unused; with ``rq.activation`` it is the dequantize scale.
    """
    # the add runs on uint32 (wrapping, like int32 without overflow): LLVM may not widen an unsigned add
    # through the sign extension, so the product stays a 32 x 32 -> 64 bit one (vpmuldq, 1 uop) instead
    # of a full 64-bit multiply (vpmullq, 3 uops), which it picks when the int32 add is hoisted to int64
    s = (acc_value.astype("uint32") + bias[c].astype("uint32")).astype("int32")
    if rq.activation is not None:  # dequantize, the float activation, quantize: realize's ops in one expression
        y = ACTIVATIONS[rq.activation](s.astype("float32") * mult[c])
        f = tirx.round(y / tirx.const(float(rq.out_scale), "float32")) + tirx.const(float(rq.zero_point), "float32")
        f = tirx.max(tirx.min(f, tirx.const(float(rq.qmax), "float32")), tirx.const(float(rq.qmin), "float32"))
        return f.astype(rq.dtype)
    if rq.scale is not None:  # realize's float requantize, op for op: round(f32(acc) * scale) + zp, clip, cast
        f = tirx.round(s.astype("float32") * mult[c]) + tirx.const(float(rq.zero_point), "float32")
        f = tirx.max(tirx.min(f, tirx.const(float(rq.qmax), "float32")), tirx.const(float(rq.qmin), "float32"))
        return f.astype(rq.dtype)
    p = s.astype("int64") * mult[c].astype("int64")
    # round half away from zero without |p| and a select: for p < 0, ceil((p - half) / 2**s) is
    # floor((p + half - 1) / 2**s), and p >> 63 is that -1 (arithmetic shifts floor)
    r = tirx.shift_right(p + half[c] + tirx.shift_right(p, tirx.const(63, "int64")), shift[c])
    r = r + tirx.const(rq.zero_point, "int64")
    y = tirx.max(tirx.min(r, tirx.const(rq.qmax, "int64")), tirx.const(rq.qmin, "int64"))
    return y.astype(rq.dtype)


#: the float activations a write-back can apply (``Requant.activation``), as TIR expressions
ACTIVATIONS = {"silu": fast_math.silu}

EPILOGUE = "hago_requant"


def requant_te(acc, bias, mult, half, shift, rq: Requant, shape, index):
    """``out[idx] = requant(acc[index(idx)], channel idx[1])`` over ``shape`` (NCHW)."""
    return te.compute(shape, lambda *i: requant_expr(acc[index(*i)], i[1], bias, mult, half, shift, rq), name=EPILOGUE)
