"""Integer depthwise conv2d on the blocked NCHW16c layout (uint8 in, 8-bit out).

In MobileNet-class nets every depthwise conv sits between two 1x1 VNNI
convs. The NCHW kernel of ``depthwise`` makes the first conv convert its
output back to NCHW and the second convert it to NCHW16c again: two passes
over the widest tensors of the net. This kernel reads and writes the blocked
layout instead (``vnni``: channels padded to 16 with the zero point), so
a whole inverted-residual block stays NCHW16c.

The layout suits a depthwise conv: the 16 channels of a block are 16
independent lanes, each with its own filter, so one tap of one output pixel
is one vector multiply-add over the lanes, whatever the stride.

One PrimFunc, stages in order:

* the conv (``hago.kernel: conv2d_depthwise_nchwc``): each thread owns a
  row segment of up to ``COLS`` output pixels x 16 lanes held in int32 zmm
  accumulators; per tap it loads the 16 filter values once and multiply-adds
  the zero-extended input pixels. The products are written as int32 ones of
  a zero-extended uint8 and a sign-extended int8: both fit int16, and LLVM
  turns the multiply-add into ``vpmaddwd`` + ``vpaddd`` (3% faster end to end
  on EfficientNet-Lite0 than forming int16 products with ``vpmullw``).
  The zero-point padding is read in place (a per-pixel bounds test, the
  same for all 16 lanes) rather than copied into a padded tensor first:
  17% less depthwise time on EfficientNet-Lite0 (2 threads), most of it on
  the stride-2 layers, whose padded copy was as large as their input;
* ``hago_dw_requant``: realize's fixed-point requantize on that segment,
  written as 8 bits (``epilogue``).

Bit-identical to ``conv2d(pad(x, zp), w, strides, dilation, groups=C,
out_dtype="int32")`` requantized by realize's formula, in NCHW16c.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from hago.errors import QuantizeError
from .epilogue import Requant, requant_expr
from .vnni import KERNEL_ATTR, LANES, _int8, _pair, _u8_shape

DEPTHWISE_NCHWC = "conv2d_depthwise_nchwc"
REQUANT = "hago_dw_requant"
COLS = 16  # output pixels per register tile (zmm accumulators), at most
NARROW_COLS = 8  # for wide, strided filters (5x5 stride 2), whose 16-pixel tiles spill
COLS_ATTR = "hago.cols"  # the emitter's choice, read by the schedule


def pack_depthwise_weight(w_oihw: np.ndarray, blocks: int) -> np.ndarray:
    """int8 ``[C, 1, KH, KW] -> [blocks, KH, KW, 16]`` int8, channels past C zero-weighted."""
    c, _, kh, kw = w_oihw.shape
    w = np.zeros((blocks * LANES, kh, kw), np.int8)
    w[:c] = w_oihw[:, 0]
    return np.ascontiguousarray(w.reshape(blocks, LANES, kh, kw).transpose(0, 2, 3, 1))


def _padded(x, padding, pad_value):
    """``x`` read as if padded by ``(top, left, bottom, right)`` with ``pad_value``: (shape, accessor)."""
    n, cb, h, wd, lanes = (int(s) for s in x.shape)
    top, left, bottom, right = padding
    if not any(padding):
        return (n, cb, h, wd, lanes), lambda *idx: x[idx]

    def read(i, c, y, z, l):  # the condition is the same for all 16 lanes: one branch per pixel and tap
        inside = tirx.all(y >= top, y < top + h, z >= left, z < left + wd)
        return tirx.if_then_else(inside, x[i, c, y - top, z - left, l], tirx.const(pad_value, x.dtype))

    return (n, cb, h + top + bottom, wd + left + right, lanes), read


def tile_columns(kernel_width: int, stride: int) -> int:
    """Output pixels per register tile: 16, or 8 for filters 5 wide and more at stride 2 and more.

    16 columns amortize each tap's filter load and the loop over twice the
    pixels (EfficientNet-Lite0's depthwise time -6%); a 5x5 stride-2 tile of
    16 spans 35 input pixels and ran 40% slower than one of 8.
    """
    return NARROW_COLS if kernel_width >= 5 and stride >= 2 else COLS


def _kernel_te(x, w, bias, mult, half, shift, strides, dilation, padding, pad_value, rq: Requant):
    (n, cb, h, wd, _), tap = _padded(x, padding, pad_value)
    _, kh_, kw_, _ = (int(s) for s in w.shape)
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h - (kh_ - 1) * dh - 1) // sh + 1, (wd - (kw_ - 1) * dw - 1) // sw + 1
    kh = te.reduce_axis((0, kh_), name="kh")
    kw = te.reduce_axis((0, kw_), name="kw")
    acc = te.compute(
        (n, cb, oh, ow, LANES),
        lambda i, c, y, z, l: te.sum(
            tap(i, c, y * sh + kh * dh, z * sw + kw * dw, l).astype("int32") * w[c, kh, kw, l].astype("int32"),
            axis=[kh, kw]),
        name=DEPTHWISE_NCHWC, attrs={KERNEL_ATTR: DEPTHWISE_NCHWC, COLS_ATTR: tile_columns(kw_, sw)},
    )
    if rq is None:  # the int32 accumulator, for a float reader
        return acc
    return te.compute(acc.shape, lambda i, c, y, z, l: requant_expr(acc[i, c, y, z, l], c * LANES + l, bias, mult,
                                                                   half, shift, rq), name=REQUANT)


def emit_conv2d_depthwise_blocked(bb: relax.BlockBuilder, x_blocked: relax.Expr, w_oihw_int8: np.ndarray,
                                  requant: Requant | None, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1),
                                  pad_value: int = 0) -> relax.Expr:
    """Depthwise conv of blocked uint8 ``x [N, C/16, H, W, 16]`` with int8 ``w [C, 1, KH, KW]``, requantized.

    ``padding`` is ``(top, left, bottom, right)``, filled with ``pad_value``
    (the input zero point). The result is blocked ``requant.dtype``; its
    padded channels hold the output zero point. Without ``requant`` it is the
    blocked int32 accumulator (a float or bf16 layer reads it). One filter per
    channel only (no channel multiplier).
    """
    xs = _u8_shape(bb, x_blocked, "depthwise conv2d")
    w = _int8(w_oihw_int8, "depthwise conv2d")
    if len(xs) != 5 or xs[4] != LANES or w.ndim != 4 or w.shape[1] != 1 or w.shape[0] > xs[1] * LANES:
        raise QuantizeError(f"depthwise conv2d {xs} x {list(w.shape)}: needs NCHW16c input and one filter "
                            "per channel")
    wp = pack_depthwise_weight(w, xs[1])
    if requant is None:  # int32 NCHW16c: a float (or bf16) reader dequantizes it in that layout
        return bb.emit_te(lambda x, wt: _kernel_te(x, wt, None, None, None, None, _pair(strides), _pair(dilation),
                                                   tuple(int(p) for p in padding), int(pad_value), None),
                          x_blocked, relax.const(wp, "int8"), primfunc_name_hint="hago_conv2d_depthwise_nchwc")

    def kernel(x, wt, bias, mult, half, shift):  # emit_te takes tensors and numbers, not a Requant
        return _kernel_te(x, wt, bias, mult, half, shift, _pair(strides), _pair(dilation),
                          tuple(int(p) for p in padding), int(pad_value), requant)

    return bb.emit_te(kernel, x_blocked, relax.const(wp, "int8"), *requant.constants(xs[1] * LANES),
                      primfunc_name_hint="hago_conv2d_depthwise_nchwc")


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def schedule_depthwise_blocked(sch, blk) -> None:
    """Per thread a row segment of output pixels x 16 lanes; taps outside it; the requantize on the segment."""
    n, c, y, z, lane, rh, rw = sch.get_loops(blk)
    ext = lambda lp: int(sch.get(lp).extent)  # noqa: E731
    cols = int(sch.get(blk).annotations.get(COLS_ATTR, NARROW_COLS))
    zo, zi = sch.split(z, [None, _divisor_at_most(ext(z), cols)])
    sch.reorder(n, c, y, zo, rh, rw, zi, lane)
    epilogue = [b for b in sch.get_consumers(blk) if sch.get(b).name_hint == REQUANT]
    wb = epilogue[0] if epilogue else sch.cache_write(blk, 0, "global")
    sch.reverse_compute_at(wb, zo)
    sch.parallel(sch.fuse(n, c, y, zo))
    sch.unroll(zi)
    sch.vectorize(lane)
    init = sch.decompose_reduction(blk, rh)
    init_loops = sch.get_loops(init)
    sch.unroll(init_loops[-2])
    sch.vectorize(init_loops[-1])
    sch.vectorize(sch.get_loops(wb)[-1])
