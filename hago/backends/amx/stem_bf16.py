"""A narrow bf16 stem (an RGB first conv) on the AMX tiles, with its kernel columns folded into K.

The AMX bf16 conv (:mod:`.conv`) takes one input pixel's channels per K
step: an RGB input would fill 3 of a tile row's 32 bf16 slots per tap, so the
stem stayed an fp32 conv, and on ResNet-18 (7x7, 3 -> 64, 112 x 112 outputs,
118 M multiply-adds) that was a quarter of the bf16 build's time.

As the int8 stems do (:func:`.conv_int8.emit_conv2d_amx_int8_taps`), the
input is rewritten once into pixel-packed rows, bf16 ``[N, 1, Hp, Wp +
slack, C]`` (zero padding, nearest-even rounding; the pass that converts the
image to a blocked layout anyway), so one A row of a kernel row ``kh``
reads the ``KW * C`` values of ``KW`` neighbouring pixels (21 for 7x7 RGB,
in a K step of 32) at a row stride of ``stride_w * C`` values: a ``KH x 1``
conv with 7 K steps per output instead of 49. The weight is laid out to
match (``[O, (kw, c) padded to 32, KH, 1]``); the values a row reads past
``KW * C`` meet zero weights. The rest (bias in the tiles, relu/clamp and
the bf16 cast on the stored tiles, ``NCHW16c`` output) is the AMX bf16
conv's.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from hago.errors import QuantizeError

from ..x86.bf16 import _pad_nchwc_te, _to_nchwc_te
from .conv import LANES, AmxBf16Conv, ConvGeometry, _fp32_source, emit_conv2d_amx_bf16
from .conv_ir import K_CHANNELS

#: values of one bf16 K step (a 64-byte tile row)
K_STEP = K_CHANNELS["bf16"]


def bf16_taps_applicable(data_shape, weight_shape, strides, dilation, groups) -> bool:
    """Whether a plain ``NCHW`` conv with few channels can run with its kernel columns in K.

    ``C * KW`` must fit one K step (32 values); one group, no dilation,
    static shapes, and fewer than 16 input channels (wider inputs take the
    blocked AMX conv).
    """
    try:
        ds, ws = [int(s) for s in data_shape], [int(s) for s in weight_shape]
        dilation, strides = [int(d) for d in dilation], [int(s) for s in strides]
    except (TypeError, ValueError):
        return False
    if len(ds) != 4 or len(ws) != 4 or int(groups) != 1 or any(d != 1 for d in dilation) or ds[1] != ws[1]:
        return False
    return ws[1] < 16 and ws[1] * ws[3] <= K_STEP and min(ds + ws + strides) >= 1


def blocks_as_stem(call) -> bool:
    """Whether the float layout pass gives bf16 conv ``call`` (fewer channels than a block) one block of all its
    channels: the layout :func:`blocked_stem` takes (``float_layout.conv_layouts``' ``bf16_stem``)."""
    a = call.attrs
    return bf16_taps_applicable(call.args[0].ty.shape, call.args[1].ty.shape, a.strides, a.dilation, a.groups)


def taps_geometry(data_shape, weight_shape, strides, padding) -> ConvGeometry:
    """The ``KH x 1`` conv over pixel-packed rows that computes the narrow ``KH x KW`` one."""
    n, c, h, w = (int(s) for s in data_shape)
    o, _, kh, kw = (int(s) for s in weight_shape)
    top, left, bottom, right = (int(p) for p in padding)
    wp = w + left + right
    return ConvGeometry(n, K_STEP, h + top + bottom, wp - kw + 1, -(-o // LANES) * LANES, kh, 1,
                        tuple(int(s) for s in strides), (0, 0, 0, 0), K_STEP, LANES, kb=K_STEP, dtype="bf16", pitch=c)


def _taps_weight(w_oihw: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """``[O16*16, 32, KH, 1]``: kernel row ``kh``'s ``(kw, c)`` values in NHWC order, zero past ``KW * C``."""
    w = np.asarray(w_oihw, np.float32)
    o, c, kh, kw = w.shape
    wt = np.zeros((g.o, K_STEP, kh, 1), np.float32)
    wt[:o, :kw * c, :, 0] = w.transpose(0, 3, 1, 2).reshape(o, kw * c, kh)
    return wt


def _padded_bias(bias, g: ConvGeometry):
    if bias is None:
        return None
    b = np.zeros(g.o, np.float32)
    b[:np.asarray(bias).size] = np.asarray(bias, np.float32).reshape(-1)
    return b


def blocked_stem(x: relax.Expr, xshape, w_oihw: np.ndarray, strides, padding, dilation, groups: int,
                 ob: int) -> AmxBf16Conv | None:
    """The stem kernel for a conv in the float layouts whose data is one block of all its channels
    (``NCHW{C}c``, the RGB first layer) and whose output is ``NCHW16c``; None if it does not apply."""
    if len(xshape) != 5 or xshape[1] != 1 or ob != LANES or w_oihw.shape[0] % LANES:
        return None
    n, _, h, w, c = xshape
    if len(padding) == 2:
        padding = tuple(padding) * 2
    if not bf16_taps_applicable((n, c, h, w), w_oihw.shape, strides, dilation, groups):
        return None
    g = taps_geometry((n, c, h, w), w_oihw.shape, strides, padding)
    top, left, bottom, _ = (int(p) for p in padding)
    wt = _taps_weight(w_oihw, g)

    def emit(bb, x, bias=None, clip=None, out_dtype="float32", threads=None, request_permission=True,
             residual=None):
        right = g.row_pixels - w - left  # the conv's right padding and the slack
        rows = bb.emit_te(_pad_nchwc_te, _fp32_source(bb, x), (top, left, bottom, right),
                          primfunc_name_hint="hago_pad_stem_bf16")
        return emit_conv2d_amx_bf16(bb, rows, wt, g, _padded_bias(bias, g), threads, request_permission,
                                    clip=clip, out_dtype=out_dtype, residual=residual)

    return AmxBf16Conv(x, int(w_oihw.shape[0]), LANES, emit)


def emit_conv2d_amx_bf16_taps(bb: relax.BlockBuilder, x: relax.Expr, w_oihw: np.ndarray, strides, padding,
                              bias=None, clip=None, out_dtype: str = "float32",
                              threads: int | None = None) -> relax.Expr:
    """The conv of plain fp32 ``NCHW`` ``x`` with float ``w_oihw``, rounded to bf16: ``NCHW16c`` ``out_dtype``.

    ``padding`` (top, left, bottom, right) is zeros. ``bias``, ``clip`` and
    ``out_dtype`` as :func:`.conv.emit_conv2d_amx_bf16`.
    """
    ty = bb.normalize(x).ty
    if str(ty.dtype) != "float32":
        raise QuantizeError(f"AMX bf16 stem: needs an fp32 NCHW input, got {ty.dtype}")
    xs = [int(s) for s in ty.shape.values]
    w = np.asarray(w_oihw, np.float32)
    o, c, kh, kw = w.shape
    g = taps_geometry(xs, w.shape, strides, padding)
    top, left, bottom, _ = (int(p) for p in padding)
    right = g.row_pixels - xs[3] - left  # the conv's right padding and the slack
    rows = bb.emit_te(_to_nchwc_te, x, c, c, (top, left, bottom, right), primfunc_name_hint="hago_nchw_to_nchwc_bf16")
    return emit_conv2d_amx_bf16(bb, rows, _taps_weight(w, g), g, bias=_padded_bias(bias, g), threads=threads,
                                clip=clip, out_dtype=out_dtype)
