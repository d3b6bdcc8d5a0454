"""AMX int8 conv2d (``tdpbusd``) on hago's blocked uint8 ``NCHW16c``, requantized on the stored tiles.

The integer twin of the bf16 conv in :mod:`.conv` (same geometry, pixel
tiles and micro-kernel loop; ``ConvGeometry.dtype == "int8"``):

* input: uint8 ``NCHW16c``, channels padded to 16 with the zero point (the
  x86 plan's blocked layout). It is read in place (16 channels per K step, a
  quarter of a tile row) or, where the conv pads or K is deep enough for a
  full row to pay, first packed into ``[N, C/kb, Hp, Wp, kb]`` (``kb`` 32 or
  64) with the spatial padding at the zero point: one pass over the uint8
  activation, the same pass the VNNI conv spends on padding alone;
* weights: int8 ``OIHW`` packed at compile time into ``[O16, C/kb, KH, KW,
  kb/4, 16, 4]`` (``pack_conv_weight(..., dtype="int8")``), zero past ``C``
  and ``O``;
* output: ``requant.dtype`` ``NCHW16c`` with ``O16`` blocks: each int32 C
  tile is stored to a 4 KiB stack buffer and requantized from there
  (:func:`hago.backends.x86.epilogue.requant_expr`, the VNNI conv's
  arithmetic), so the result is bit-identical to realize's requantize of the
  int32 conv and no int32 tensor reaches memory. Padded output channels get
  multiplier 0 and come out at the zero point, as the blocked layout wants.

The zero-point term of the input is in ``requant.bias`` (realize folds
``-zx * sum(w)`` into it); the padding holds the zero point, so it adds
exactly that term and nothing else.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from hago.errors import QuantizeError

from ..base import Requant
from ..x86.vnni import _to_nchwc_te
from .conv import ConvGeometry, conv_kernel_func, k_block, needs_pack, pack_conv_weight, pack_data_func
from .dense import LANES, default_threads


def amx_int8_conv_applicable(data_shape, weight_shape, strides, dilation, groups) -> bool:
    """Whether the AMX int8 conv takes a uint8 ``NCHW16c`` input (5-D ``data_shape``) and OIHW ``weight_shape``.

    One group, no dilation, static shapes, a weight whose input channels fit the blocks.
    """
    try:
        ds, ws = [int(s) for s in data_shape], [int(s) for s in weight_shape]
        strides, dilation = [int(s) for s in strides], [int(d) for d in dilation]
    except (TypeError, ValueError):
        return False
    if len(ds) != 5 or ds[4] != LANES or len(ws) != 4 or int(groups) != 1 or any(d != 1 for d in dilation):
        return False
    return min(strides) >= 1 and ds[1] * LANES - LANES < ws[1] <= ds[1] * LANES and min(ds + ws) >= 1


def int8_geometry(data_shape, weight_shape, strides, padding) -> ConvGeometry:
    """The geometry of the int8 conv: ``NCHW16c`` in, ``O16`` blocks of 16 out."""
    n, cblocks, h, w, ib = (int(s) for s in data_shape)
    o, _, kh, kw = (int(s) for s in weight_shape)
    padding = tuple(int(p) for p in padding)
    padding = padding * 2 if len(padding) == 2 else padding
    g = ConvGeometry(n, cblocks * ib, h, w, -(-o // LANES) * LANES, kh, kw, tuple(int(s) for s in strides),
                     padding, ib, LANES, dtype="int8")
    return dataclasses.replace(g, kb=k_block(g, "uint8"))


def emit_conv2d_amx_int8(bb: relax.BlockBuilder, x_u8: relax.Expr, w_oihw: np.ndarray, strides, padding,
                         pad_value: int, requant: Requant, threads: int | None = None,
                         request_permission: bool = True, g: ConvGeometry | None = None) -> relax.Expr:
    """The requantized conv of uint8 ``NCHW16c`` ``x_u8`` and int8 ``w_oihw``: ``requant.dtype`` ``NCHW16c``.

    ``padding`` (top, left, bottom, right) holds ``pad_value`` (the input's
    zero point). ``g``: a geometry to use instead of :func:`int8_geometry`'s
    (tests and measurements force ``kb`` or the tile mode).
    """
    ty = bb.normalize(x_u8).ty
    if str(ty.dtype) != "uint8":
        raise QuantizeError(f"AMX int8 conv: needs uint8 activations, got {ty.dtype}")
    try:
        xs = [int(s) for s in ty.shape.values]
    except (TypeError, AttributeError):
        raise QuantizeError(f"AMX int8 conv: needs a static input shape, got {ty.shape}") from None
    w = np.asarray(w_oihw)
    g = g or int8_geometry(xs, w.shape, strides, padding)
    if needs_pack(g, "uint8"):
        pack = bb.add_func(pack_data_func(g, "uint8", int(pad_value)), "hago_pack_amx_conv_u8")
        x_u8 = bb.emit(relax.call_tir(pack, [x_u8], relax.TensorType((g.n, g.cb, g.hp, g.wp, g.k_block), "uint8")))
    func = conv_kernel_func(g, threads or default_threads(), False, request_permission, requant=requant)
    gv = bb.add_func(func, "hago_conv2d_amx_int8")
    weight = pack_conv_weight(np.pad(w, ((0, 0), (0, g.c - w.shape[1]), (0, 0), (0, 0))), g.k_block, "int8")
    args = [x_u8, relax.const(tvm.runtime.tensor(weight)), *requant.constants(g.o16 * LANES)]
    out_type = relax.TensorType((g.n, g.o16, g.oh, g.ow, LANES), requant.dtype)
    return bb.emit(relax.call_tir(gv, args, out_type))


#: fewest input channels for which the AMX conv beats the VNNI one (``benchmarks/amx_vs_vnni.py``, float requantize:
#: 3x3 convs of 64-512 channels 2.1-3.2x; 1x1 from 64 channels 1.04-1.86x, below it 0.81-0.94x but for 32->16)
AMX_MIN_CHANNELS = {"1x1": 64, "kxk": 32}


def amx_int8_pays(g: ConvGeometry) -> bool:
    """Whether the tiles beat VNNI for this conv: the rule measured by ``benchmarks/amx_vs_vnni.py``.

    Convs with a kernel window win 2.1-3.2x (ResNet-18's 3x3 convs, 64 to
    512 channels). Pointwise convs win 1.04-1.86x from 64 input channels up,
    and lose below (16, 24, 32 or 40 channels expanding 6x: 16->96 at 112 x
    112 ran 120 us on AMX against 103 us on VNNI): there each K step fills a
    quarter of a tile row, and the requantize of the stored tiles, which VNNI
    does on its register tiles, dominates.
    """
    kind = "1x1" if g.kh * g.kw == 1 else "kxk"
    return g.c >= AMX_MIN_CHANNELS[kind]


# ---- narrow first layers: the kernel columns folded into K ------------------------------------------
def amx_int8_taps_applicable(data_shape, weight_shape, strides, dilation, groups) -> bool:
    """Whether a plain ``NCHW`` uint8 conv with few channels (an RGB stem) can run with its columns in K.

    ``C * KW`` must fit one tile row (64 bytes); one group, no dilation, static shapes.
    """
    try:
        ds, ws = [int(s) for s in data_shape], [int(s) for s in weight_shape]
        dilation = [int(d) for d in dilation]
    except (TypeError, ValueError):
        return False
    if len(ds) != 4 or len(ws) != 4 or int(groups) != 1 or any(d != 1 for d in dilation) or ds[1] != ws[1]:
        return False
    return ws[1] * ws[3] <= 64 and min(ds + ws) >= 1


#: the fewest values per output (C x KH x KW) for which a narrow stem pays on the tiles
#: (``benchmarks/amx_vs_vnni.py``: ResNet-18's 7x7 3->64, K = 147, 1.62x VNNI; MobileNetV2's 3x3 3->32, K = 27, 0.93x)
AMX_MIN_TAPS_K = 64


def amx_int8_taps_pays(weight_shape) -> bool:
    """Whether a narrow stem runs faster on the tiles than on VNNI: enough multiply-adds per output to pay the
    requantize of the stored tiles (the measured rule, :data:`AMX_MIN_TAPS_K`)."""
    _, c, kh, kw = (int(s) for s in weight_shape)
    return c * kh * kw >= AMX_MIN_TAPS_K


def taps_k_block(c: int, kw: int) -> int:
    """The K step holding one kernel row's ``kw * c`` values: 16, 32 or 64."""
    return next(kb for kb in (16, 32, 64) if c * kw <= kb)


def taps_geometry(data_shape, weight_shape, strides, padding) -> ConvGeometry:
    """The ``KH x 1`` conv over pixel-packed rows that computes a narrow ``KH x KW`` conv (:class:`ConvGeometry`)."""
    n, c, h, w = (int(s) for s in data_shape)
    o, _, kh, kw = (int(s) for s in weight_shape)
    top, left, bottom, right = (int(p) for p in padding)
    sh, sw = (int(s) for s in strides)
    kb = taps_k_block(c, kw)
    wp = w + left + right
    # "pixels" of the folded conv: every padded column a window can start at; the kernel reads kb bytes from each
    return ConvGeometry(n, kb, h + top + bottom, wp - kw + 1, -(-o // LANES) * LANES, kh, 1, (sh, sw),
                        (0, 0, 0, 0), kb, LANES, kb=kb, dtype="int8", pitch=c)


def emit_conv2d_amx_int8_taps(bb: relax.BlockBuilder, x_u8: relax.Expr, w_oihw: np.ndarray, strides, padding,
                              pad_value: int, requant: Requant, threads: int | None = None) -> relax.Expr:
    """The requantized conv of a plain ``NCHW`` uint8 input with few channels: ``requant.dtype`` ``NCHW16c``.

    The input is rewritten once as ``NCHW{C}c`` (all channels of a pixel
    together), padded with ``pad_value`` and ``slack`` pixels at each row's end
    (the x86 ``nchw_to_nchwc`` kernel, the pass the VNNI conv makes too), so
    the tiles read each kernel row's ``KW * C`` bytes as one A row (row stride
    ``stride_w * C`` bytes) and run a ``KH x 1`` conv with a K step of ``KW *
    C`` values rounded up to 16/32/64, instead of ``C`` channels padded to 16
    per tap. The bytes an A row reads past ``KW * C`` meet zero weights.
    """
    ty = bb.normalize(x_u8).ty
    xs = [int(s) for s in ty.shape.values]
    w = np.asarray(w_oihw)
    o, c, kh, kw = w.shape
    g = taps_geometry(xs, w.shape, strides, padding)
    top, left, bottom, _ = (int(p) for p in padding)
    right = g.row_pixels - xs[3] - left  # the conv's right padding and the slack
    rows = bb.emit_te(_to_nchwc_te, x_u8, c, c, (top, left, bottom, right), int(pad_value),
                      primfunc_name_hint="hago_nchw_to_nchwc")
    wt = np.zeros((o, g.k_block, kh, 1), np.int8)
    wt[:, :kw * c, :, 0] = w.transpose(0, 3, 1, 2).reshape(o, kw * c, kh)  # [o, (kw, c), kh]: NHWC byte order
    return emit_conv2d_amx_int8(bb, rows, wt, g.strides, (0, 0, 0, 0), pad_value, requant, threads, g=g)
