"""Integer conv2d with packed 4-bit weights on x86 VNNI (W4A8): the blocked VNNI conv, half the weight bytes.

The same kernel as :func:`.vnni.emit_conv2d_vnni` (NCHW{b}c activations,
layouts, padding and requantize unchanged) with the weight constant of
:func:`.int4.pack_int4_conv`: uint8, two weights per byte, one 64-byte load
per 16 output channels x 8 input channels, unpacked in registers exactly as
the packed dense does (:mod:`.vnni_int4`): ``p << 4`` and ``p & 0xF0`` read
as signed bytes are 16 x the low and high weights, fed to two ``vpdpbusd``
(the tensor intrinsic ``HAGO_VNNI_INT4_INTRIN``).

The accumulator is thus 16 x the int32 conv; one arithmetic ``>> 4`` on it
(exact: every term is a multiple of 16) restores it *before* anything else
reads it: a block of its own on the register tile where the kernel returns
int32, inside the requantize epilogue's expression (ahead of the bias add)
where it returns requantized blocked uint8. Exact while
``16 * 255 * 8 * K < 2**31`` with ``K = Cp * KH * KW`` per group
(:func:`conv_int4_applicable`; the plan falls back to the int8 kernel above).

Depthwise convs keep int8 weights: their kernels (:mod:`.depthwise`,
:mod:`.depthwise_blocked`) broadcast one weight per tap and channel against
widened activations, no ``vpdpbusd`` 16x4 weight block to feed nibbles
into, and their weights are a few KB. Input channels are padded to a multiple of 8 (two 4-channel groups per
byte): a 12-channel input costs 16 channels of MACs, not the int8 kernel's 12;
the plan keeps a stem of at most 4 channels on the int8 kernel (no byte saved).

What it costs: convs are compute-bound, so the 3 unpacking ops per 64-byte
load (shared by the tile's output columns) are pure overhead. One thread,
blocked in and out, requantized (CPU time, shared machine): ResNet-18's 3x3
256->256 at 14x14 375 us packed vs 348 us int8, a 1x1 64->256 at 56x56
284 vs 251 us (float requantize; with the fixed-point one 427 vs 384 and
879 vs 710 us). The gain is the weight bytes, as the issue expects. On AMX
the tiles run the same convs in int8 at 91 and 221 us: a 4-bit conv the
tiles take stays there (:mod:`hago.backends.amx.plan`).
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from hago.errors import QuantizeError
from hago.tvm_consts import KERNEL_ATTR

from .epilogue import Requant, requant_expr
from .int4 import K_BLOCK, LANES, RED, _up, fits_int4, pack_int4_conv
from .vnni import CONV_EPILOGUE, ConvWeights, emit_conv2d_vnni, vnni_applicable
from .vnni_int4 import MAX_K
from .vnni_intrin import weight16

CONV_INT4 = "conv2d_nchwc_int4_vnni"
#: the write-back block dividing the 16 x accumulator by 16 (computed on the register tile)
CONV_INT4_SHIFT = "hago_conv_int4_shift"


def conv_int4_applicable(x_shape, w_shape, groups: int = 1) -> bool:
    """Whether :func:`emit_conv2d_vnni_int4` takes an NCHW ``x`` and OIHW ``w`` (static shapes, the VNNI conv's
    rules with 8-channel groups, and ``K = Cp * KH * KW <= MAX_K`` so the 16 x accumulator fits int32).

    K counts the channels padded to 16 (a blocked input's padding, an upper bound of the NCHW one's).
    """
    if not vnni_applicable("conv2d", x_shape, w_shape, groups, red=K_BLOCK):
        return False
    _, c, kh, kw = (int(d) for d in w_shape)
    return _up(c, LANES) * kh * kw <= MAX_K


def _shift4(v):
    return tirx.shift_right(v, tirx.const(4, "int32"))


def _conv_int4_te(data, kernel, strides, dilation, groups):
    """16 x the blocked conv: ``acc[n, oc, y, x, l] = sum data[.., 8g + 4h + s] * 16 w_h``, then ``>> 4``."""
    n, _, h, w, _ = (int(s) for s in data.shape)
    occ, icc, kh_, kw_, ng, ob, _ = (int(s) for s in kernel.shape)
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h - (kh_ - 1) * dh - 1) // sh + 1, (w - (kw_ - 1) * dw - 1) // sw + 1
    ic = te.reduce_axis((0, icc), name="ic")
    kh = te.reduce_axis((0, kh_), name="kh")
    kw = te.reduce_axis((0, kw_), name="kw")
    g = te.reduce_axis((0, ng), name="icg")
    half = te.reduce_axis((0, 2), name="half")
    s = te.reduce_axis((0, RED), name="ics")
    per_group = occ // groups

    def body(i, oc, y, x, lane):
        chunk = ic if groups == 1 else (oc // per_group) * icc + ic
        d = data[i, chunk, y * sh + kh * dh, x * sw + kw * dw, g * K_BLOCK + half * RED + s]
        return te.sum(d.astype("int32") * weight16(kernel[oc, ic, kh, kw, g, lane, s], half),
                      axis=[ic, kh, kw, g, half, s])

    return te.compute((n, occ, oh, ow, ob), body, name=CONV_INT4, attrs={KERNEL_ATTR: CONV_INT4})


def _conv_int4_int32_te(data, kernel, strides, dilation, groups):
    acc = _conv_int4_te(data, kernel, strides, dilation, groups)
    return te.compute(acc.shape, lambda *i: _shift4(acc[i]), name=CONV_INT4_SHIFT)


def _conv_int4_requant_te(data, kernel, bias, mult, half, shift, strides, dilation, groups, rq: Requant):
    """The requantize epilogue of :func:`.vnni._conv_requant_te` on ``acc >> 4``: blocked 8-bit out."""
    acc = _conv_int4_te(data, kernel, strides, dilation, groups)
    return te.compute(
        acc.shape,
        lambda i, c, y, x, l: requant_expr(_shift4(acc[i, c, y, x, l]), c * LANES + l, bias, mult, half, shift, rq),
        name=CONV_EPILOGUE,
    )


INT4_CONV = ConvWeights(pack=pack_int4_conv, in_block=lambda wp: int(wp.shape[4]) * K_BLOCK, dtype="uint8",
                        red=K_BLOCK, conv=_conv_int4_int32_te, conv_requant=_conv_int4_requant_te,
                        name="hago_conv2d_nchwc_int4_vnni")


def emit_conv2d_vnni_int4(bb: relax.BlockBuilder, x_u8: relax.Expr, w_oihw_int8: np.ndarray, strides=(1, 1),
                          dilation=(1, 1), groups: int = 1, padding=(0, 0, 0, 0), pad_value: int = 0,
                          requant: Requant | None = None, out_layout: str = "NCHW",
                          relax_back: bool = False) -> relax.Expr:
    """:func:`.vnni.emit_conv2d_vnni` (same arguments, same result bit for bit) with int8 OIHW weights in
    [-8, 7] stored packed, two per byte. Check :func:`conv_int4_applicable` first."""
    w = np.asarray(w_oihw_int8)
    if w.dtype != np.int8 or not fits_int4(w):
        raise QuantizeError(f"conv2d: packed 4-bit weights must be int8 in [-8, 7], got {w.dtype} "
                            f"in [{w.min(initial=0)}, {w.max(initial=0)}]")
    shape = [int(d) for d in bb.normalize(x_u8).ty.shape.values]
    logical = [shape[0], w.shape[1] * int(groups), *shape[2:4]] if len(shape) == 5 else shape
    if not conv_int4_applicable(logical, w.shape, int(groups)):
        raise QuantizeError(f"conv2d {shape} x {list(w.shape)}: no packed 4-bit kernel (layout, or K > {MAX_K})")
    return emit_conv2d_vnni(bb, x_u8, w, strides, dilation, groups, padding, pad_value, requant, out_layout,
                            relax_back, weights=INT4_CONV)


__all__ = ["CONV_INT4", "CONV_INT4_SHIFT", "INT4_CONV", "conv_int4_applicable",
           "emit_conv2d_vnni_int4"]
