"""Integer dense / conv2d on x86 VNNI layouts, emitted as named TE kernels.

``vpdpbusd`` multiplies 4 unsigned activation bytes by a 16x4 block of signed
weight bytes into 16 int32 lanes. It fires only when the weights sit in that
block order, so this module packs them at compile time in numpy:

* dense ``[K, N] -> [N/16, K/4, 16, 4]``;
* conv ``OIHW -> OIHW{b/4}i16o4i`` (``b`` the input channel block, 16 where
  the channels allow) with activations in ``NCHW{b}c``, as TOPI's
  ``conv2d_NCHWc_int8`` lays them out.

K, N, C and O are padded with zero weights up to the block sizes (a zero
weight contributes nothing) and the output is sliced back, so each emitter
keeps the plain op's contract: same input, bit-identical int32 accumulator.

Between integer layers the conv can also stay blocked (``out_layout=
"NCHW16c"``): it then takes and/or returns uint8 ``[N, Cp/16, H, W, 16]``,
channels padded up to 16 with the *zero point* (real value 0), so the next
conv, a residual add, relu/clip and max-pool run on the blocked tensor and
the layout changes only where a float op or a plain-layout op needs NCHW.

Every kernel block carries the annotation ``hago.kernel`` naming its
schedule; ``schedule_vnni`` (in ``schedules``) finds them by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from tvm import relax, te, tirx
from tvm.relax import op as O

from hago.errors import QuantizeError
from hago.tvm_consts import KERNEL_ATTR
from .epilogue import Requant, requant_expr

DENSE = "dense_vnni"
CONV = "conv2d_nchwc_vnni"
TO_NCHWC = "nchw_to_nchwc"
FROM_NCHWC = "nchwc_to_nchw"
PAD_NCHWC = "pad_nchwc"
CONV_EPILOGUE = "hago_conv_requant"
BLOCKED = "NCHW16c"  # the layout of blocked uint8 activations between integer layers
LANES, RED = 16, 4  # vpdpbusd: 16 int32 output lanes, 4 bytes reduced per lane


def _up(v: int, m: int) -> int:
    return -(-v // m) * m


def _pair(v) -> tuple[int, int]:
    """``2``, ``[2]``, ``(2, 2)`` or a TVM array of IntImm -> ``(2, 2)``."""
    try:
        t = tuple(int(x) for x in v)
    except TypeError:
        t = (int(v),)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def in_block(c_per_group: int, red: int = RED) -> int:
    """Input channel block: the largest of 16/8/4/2 (at least ``red``) dividing the ``red``-padded channel count.

    ``red``: values reduced per 32-bit lane (4 bytes for ``vpdpbusd``, 2 bf16 for ``vdpbf16ps``).
    """
    cp = _up(c_per_group, red)
    return next(b for b in (16, 8, 4, 2) if b >= red and cp % b == 0)


def vnni_applicable(kind: str, x_shape, w_shape, groups: int = 1, red: int = RED) -> bool:
    """Whether ``emit_dense_vnni`` / ``emit_conv2d_vnni`` handles this layer.

    ``kind`` is ``"dense"`` (``x [..., K]``, ``w [K, N]``) or ``"conv2d"``
    (``x`` NCHW, ``w`` OIHW). Shapes must be static. Grouped convs qualify
    only when every group has a multiple of 4 input and 16 output channels
    (depthwise does not: padding each 1-channel group to 16x4 would multiply
    the work by 64). Single-group convs with fewer than 4 input channels are
    still taken: padding 3 to 4 costs a third more MACs, far less than the
    VNNI gain.
    """
    try:
        xs, ws = [int(s) for s in x_shape], [int(s) for s in w_shape]
    except (TypeError, ValueError):
        return False
    if kind == "dense":
        return len(xs) >= 1 and len(ws) == 2 and xs[-1] == ws[0]
    if kind != "conv2d" or len(xs) != 4 or len(ws) != 4 or groups < 1:
        return False
    c, o = xs[1], ws[0]
    if c != ws[1] * groups or o % groups:
        return False
    return groups == 1 or (ws[1] % red == 0 and (o // groups) % LANES == 0)


# ---- weight packing (numpy, at compile time) -------------------------------
def pack_dense_weight(w_kn: np.ndarray, red: int = RED) -> np.ndarray:
    """``[K, N] -> [Np/16, Kp/red, 16, red]`` in ``w_kn``'s dtype, zero-padded to multiples of ``red`` / 16."""
    k, n = w_kn.shape
    w = np.zeros((_up(k, red), _up(n, LANES)), w_kn.dtype)
    w[:k, :n] = w_kn
    kp, np_ = w.shape
    return np.ascontiguousarray(w.T.reshape(np_ // LANES, LANES, kp // red, red).transpose(0, 2, 1, 3))


def pack_conv_weight(w_oihw: np.ndarray, groups: int = 1, in_channels: int | None = None,
                     red: int = RED) -> np.ndarray:
    """``[O, I, KH, KW] -> [Op/16, Ip/b, KH, KW, b/red, 16, red]`` (``b = in_block(I, red)``), ``w_oihw``'s dtype.

    ``I`` is per group; with one group O and I are zero-padded up to 16 and ``red``.
    ``in_channels`` (one group only) is the channel count of a blocked NCHW16c
    input, channel padding included: I is zero-padded up to it and ``b = 16``.
    """
    o, i, kh, kw = w_oihw.shape
    b = in_block(i, red) if in_channels is None else LANES
    op, ip = (_up(o, LANES), _up(i, red) if in_channels is None else int(in_channels)) if groups == 1 else (o, i)
    w = np.zeros((op, ip, kh, kw), w_oihw.dtype)
    w[:o, :i] = w_oihw
    w = w.reshape(op // LANES, LANES, ip // b, b // red, red, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 2, 5, 6, 3, 1, 4))


# ---- TE kernels -------------------------------------------------------------
def _dense_te(a, wp):
    m, kp = (int(s) for s in a.shape)
    np_ = int(wp.shape[0]) * LANES
    k = te.reduce_axis((0, kp), name="k")
    return te.compute(
        (m, np_),
        lambda i, j: te.sum(
            a[i, k].astype("int32") * wp[j // LANES, k // RED, j % LANES, k % RED].astype("int32"), axis=k
        ),
        name=DENSE,
        attrs={KERNEL_ATTR: DENSE},
    )


def _pad_k_te(a, kp):
    m, k = (int(s) for s in a.shape)
    return te.compute(
        (m, kp), lambda i, j: tirx.if_then_else(j < k, a[i, tirx.min(j, k - 1)], tirx.const(0, a.dtype)),
        name="hago_pad_k",
    )


def _to_nchwc_te(x, cp, b, padding=(0, 0, 0, 0), pad_value=0):
    """NCHW -> NCHW{b}c, zero-padding channels up to ``cp`` and spatially by ``padding`` with ``pad_value``.

    The padded channels meet zero weights, so any value does there; spatial
    padding holds the input zero point.
    """
    n, c, h, w = (int(s) for s in x.shape)
    top, left, bottom, right = padding

    def body(i, cc, y, z, cb):
        conds = []
        if cp != c:
            conds.append(cc * b + cb < c)
        if any(padding):
            conds += [y >= top, y < top + h, z >= left, z < left + w]
        if not conds:
            return x[i, cc * b + cb, y, z]
        ch = cc * b + cb if cp == c else tirx.min(cc * b + cb, c - 1)
        return tirx.if_then_else(tirx.all(*conds), x[i, ch, y - top, z - left], tirx.const(pad_value, x.dtype))

    return te.compute((n, cp // b, h + top + bottom, w + left + right, b), body, name=TO_NCHWC,
                      attrs={KERNEL_ATTR: TO_NCHWC})


def _from_nchwc_te(acc, o):
    n, _, h, w, ob = (int(s) for s in acc.shape)
    return te.compute(
        (n, o, h, w), lambda i, c, y, z: acc[i, c // ob, y, z, c % ob], name=FROM_NCHWC,
        attrs={KERNEL_ATTR: FROM_NCHWC},
    )


def _from_nchwc_requant_te(acc, o, bias, mult, half, shift, rq: Requant):
    """NCHW16c int32 -> NCHW 8-bit, requantized on the way (same loops as ``_from_nchwc_te``)."""
    n, _, h, w, ob = (int(s) for s in acc.shape)
    return te.compute(
        (n, o, h, w),
        lambda i, c, y, z: requant_expr(acc[i, c // ob, y, z, c % ob], c, bias, mult, half, shift, rq),
        name=FROM_NCHWC, attrs={KERNEL_ATTR: FROM_NCHWC},
    )


def _pad_nchwc_te(x, padding, pad_value):
    """Blocked ``[N, C/b, H, W, b]`` padded spatially by ``(top, left, bottom, right)`` with ``pad_value``."""
    n, cc, h, w, b = (int(s) for s in x.shape)
    top, left, bottom, right = padding

    def body(i, c, y, z, l):
        inside = tirx.all(y >= top, y < top + h, z >= left, z < left + w)
        return tirx.if_then_else(inside, x[i, c, y - top, z - left, l], tirx.const(pad_value, x.dtype))

    return te.compute((n, cc, h + top + bottom, w + left + right, b), body, name=PAD_NCHWC,
                      attrs={KERNEL_ATTR: PAD_NCHWC})


def to_blocked_te(x, pad_value):
    """NCHW uint8 -> NCHW16c, channels padded to 16 with ``pad_value`` (the zero point)."""
    return _to_nchwc_te(x, _up(int(x.shape[1]), LANES), LANES, (0, 0, 0, 0), pad_value)


def from_blocked_te(x, channels):
    """NCHW16c -> NCHW, the first ``channels`` channels (the padding dropped)."""
    return _from_nchwc_te(x, channels)


def blocked_conv_te(data, kernel, strides, dilation, groups, acc_dtype: str = "int32", name: str = CONV):
    """The blocked conv both dot-product kernels share: ``NCHW{b}c`` data x ``OIHW{b/r}i{ob}o{r}i`` weights
    (``r`` the instruction's reduction: 4 int8 for ``vpdpbusd``, 2 bf16 for ``vdpbf16ps``, the weight's last
    axis), summed in ``acc_dtype``."""
    n, _, h, w, b = (int(s) for s in data.shape)
    occ, icc, kh_, kw_, nf, ob, red = (int(s) for s in kernel.shape)
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h - (kh_ - 1) * dh - 1) // sh + 1, (w - (kw_ - 1) * dw - 1) // sw + 1
    ic = te.reduce_axis((0, icc), name="ic")
    kh = te.reduce_axis((0, kh_), name="kh")
    kw = te.reduce_axis((0, kw_), name="kw")
    f = te.reduce_axis((0, nf), name="icf")
    s = te.reduce_axis((0, red), name="ics")
    per_group = occ // groups

    def body(i, oc, y, x, lane):
        chunk = ic if groups == 1 else (oc // per_group) * icc + ic
        d = data[i, chunk, y * sh + kh * dh, x * sw + kw * dw, f * red + s]
        if data.dtype == "uint16":  # bf16 bits (a buffer of the kernel's own, see bf16_intrin)
            d = tirx.reinterpret("bfloat16", d)
        return te.sum(d.astype(acc_dtype) * kernel[oc, ic, kh, kw, f, lane, s].astype(acc_dtype),
                      axis=[ic, kh, kw, f, s])

    return te.compute((n, occ, oh, ow, ob), body, name=name, attrs={KERNEL_ATTR: name})


def _conv_requant_te(data, kernel, bias, mult, half, shift, strides, dilation, groups, rq: Requant):
    """The conv with its requantize as a second block of the same PrimFunc: blocked uint8 out.

    ``schedule_conv`` computes the epilogue on each register tile (it takes the
    place of the accumulator write-back), so the int32 result never leaves the cache.
    """
    acc = blocked_conv_te(data, kernel, strides, dilation, groups)
    return te.compute(
        acc.shape,
        lambda i, c, y, x, l: requant_expr(acc[i, c, y, x, l], c * LANES + l, bias, mult, half, shift, rq),
        name=CONV_EPILOGUE,
    )


# ---- Relax emitters ---------------------------------------------------------
def emit_to_blocked(bb: relax.BlockBuilder, x_u8_nchw: relax.Expr, zero_point: int) -> relax.Expr:
    """uint8 NCHW -> NCHW16c with the channel padding at ``zero_point`` (see the module docstring)."""
    return bb.emit_te(to_blocked_te, x_u8_nchw, int(zero_point), primfunc_name_hint="hago_nchw_to_nchwc")


def emit_from_blocked(bb: relax.BlockBuilder, x_blocked: relax.Expr, channels: int) -> relax.Expr:
    """NCHW16c -> NCHW with ``channels`` channels."""
    return bb.emit_te(from_blocked_te, x_blocked, int(channels), primfunc_name_hint="hago_nchwc_to_nchw")


def _u8_shape(bb: relax.BlockBuilder, expr: relax.Expr, what: str) -> list[int]:
    ty = bb.normalize(expr).ty
    if str(ty.dtype) != "uint8":
        raise QuantizeError(f"{what}: VNNI needs uint8 activations, got {ty.dtype}; shift int8 by +128 first")
    try:
        return [int(s) for s in ty.shape.values]
    except (TypeError, AttributeError):
        raise QuantizeError(f"{what}: VNNI kernels need a static input shape, got {ty.shape}") from None


def _int8(w: np.ndarray, what: str) -> np.ndarray:
    w = np.asarray(w)
    if w.dtype != np.int8:
        raise QuantizeError(f"{what}: VNNI weights must be int8 numpy arrays, got {w.dtype}")
    return w


def emit_dense_vnni(bb: relax.BlockBuilder, x_u8: relax.Expr, w_kn_int8: np.ndarray) -> relax.Expr:
    """int32 ``x @ w`` for uint8 ``x [..., K]`` and int8 numpy ``w [K, N]`` through VNNI.

    Bit-identical to ``matmul(x, w, out_dtype="int32")``. Leading dims of ``x``
    are flattened into M and restored.
    """
    xs = _u8_shape(bb, x_u8, "dense")
    w = _int8(w_kn_int8, "dense")
    if not vnni_applicable("dense", xs, w.shape):
        raise QuantizeError(f"dense {xs} x {list(w.shape)}: shapes do not match")
    wp = pack_dense_weight(w)
    return emit_packed_dense(bb, x_u8, xs, w.shape, int(wp.shape[1]) * RED,
                             lambda a: bb.emit_te(_dense_te, a, relax.const(wp, "int8"),
                                                  primfunc_name_hint="hago_dense_vnni"))


def emit_packed_dense(bb: relax.BlockBuilder, x_u8: relax.Expr, xs: list[int], w_shape, kp: int, kernel):
    """The shape plumbing around a packed-weight dense kernel: ``[..., K]`` flattened to ``[M, K]``, K
    zero-padded to ``kp``, ``kernel(a [M, kp]) -> int32 [M, Np]``, then sliced to N and reshaped back."""
    k, n = (int(d) for d in w_shape)
    a = x_u8 if len(xs) == 2 else bb.emit(O.reshape(x_u8, (-1, k)))
    if kp != k:
        a = bb.emit_te(_pad_k_te, a, kp, primfunc_name_hint="hago_pad_k")
    acc = kernel(a)
    if int(bb.normalize(acc).ty.shape.values[1]) != n:
        acc = bb.emit(O.strided_slice(acc, axes=[1], begin=[0], end=[n]))
    if len(xs) != 2:
        acc = bb.emit(O.reshape(acc, (*xs[:-1], n)))
    return acc


@dataclass(frozen=True)
class ConvWeights:
    """How a VNNI conv stores its weights and which TE computes with them: the int8 kernel's
    (:data:`INT8_CONV`) or the packed 4-bit one's (:mod:`.vnni_conv_int4`).

    ``pack(w, groups, in_channels)`` packs the OIHW numpy weight (``in_channels``:
    a blocked input's padded channel count, or None); ``in_block(wp)`` is the
    NCHW{b}c input block ``b`` the packed weight reads; ``red`` the input
    channels per group must be a multiple of (grouped convs); ``conv`` and
    ``conv_requant`` are the int32 and the requantized-blocked TE kernels
    (arguments of :func:`blocked_conv_te` / :func:`_conv_requant_te`).
    """

    pack: Callable
    in_block: Callable
    dtype: str
    red: int
    conv: Callable
    conv_requant: Callable
    name: str


INT8_CONV = ConvWeights(
    pack=lambda w, groups, in_channels: pack_conv_weight(w, groups, in_channels=in_channels),
    in_block=lambda wp: int(wp.shape[4]) * RED, dtype="int8", red=RED, conv=blocked_conv_te,
    conv_requant=_conv_requant_te, name="hago_conv2d_nchwc_vnni")


def emit_conv2d_vnni(bb: relax.BlockBuilder, x_u8: relax.Expr, w_oihw_int8: np.ndarray,
                     strides=(1, 1), dilation=(1, 1), groups: int = 1, padding=(0, 0, 0, 0),
                     pad_value: int = 0, requant: Requant | None = None, out_layout: str = "NCHW",
                     relax_back: bool = False, weights: ConvWeights = INT8_CONV) -> relax.Expr:
    """int32 NCHW ``conv2d(x, w)`` for uint8 ``x`` through VNNI (8-bit with ``requant``).

    ``padding`` (top, left, bottom, right) is filled with ``pad_value`` (the
    zero point) by the NCHW -> NCHW16c conversion, so no padded NCHW copy is
    made. Bit-identical to ``conv2d(pad(x, padding, pad_value), w, strides,
    padding=0, dilation, groups, out_dtype="int32")``. Check ``vnni_applicable`` first.
    With ``requant`` (see ``epilogue``) the layout conversion back to NCHW
    also adds the bias and requantizes, and the result is ``requant.dtype``.

    Blocked layouts (one group only): a 5-D ``x`` is taken as NCHW16c (see
    the module docstring; it is padded in that layout), and with
    ``out_layout="NCHW16c"`` (needs ``requant``) the result stays blocked:
    the requantize runs on the kernel's register tiles and no layout
    conversion is emitted at all.

    ``relax_back`` (no ``requant``, one group, output channels a multiple of
    16): the int32 NCHW16c -> NCHW conversion is a Relax ``layout_transform``
    instead of the kernel, for a layer whose float consumers read it blocked
    again: the build's :func:`~hago.backends.cpu.layout_pairs.cancel_layout_pairs`
    then drops it and its inverse, and the bias and dequantize run on the
    blocked accumulator.
    """
    blocked_in = len(bb.normalize(x_u8).ty.shape.values) == 5
    xs = _u8_shape(bb, x_u8, "conv2d")
    w = _int8(w_oihw_int8, "conv2d")
    groups = int(groups)
    logical = [xs[0], w.shape[1] * groups, xs[2], xs[3]] if blocked_in else xs
    if not vnni_applicable("conv2d", logical, w.shape, groups, red=weights.red):
        raise QuantizeError(f"conv2d {xs} x {list(w.shape)} groups={groups} has no VNNI layout; "
                            "check vnni_applicable first")
    if (blocked_in or out_layout != "NCHW") and (groups != 1 or (blocked_in and xs[4] != LANES)):
        raise QuantizeError(f"conv2d {xs}: blocked layouts need one group and 16-channel blocks")
    if out_layout not in ("NCHW", BLOCKED) or (out_layout == BLOCKED and requant is None):
        raise QuantizeError(f"conv2d: out_layout {out_layout!r} needs 'NCHW', or 'NCHW16c' with a requant")
    o = int(w.shape[0])
    padding = tuple(int(p) for p in padding)
    if blocked_in:
        wp = weights.pack(w, 1, xs[1] * LANES)
        data = x_u8
        if any(padding):
            data = bb.emit_te(_pad_nchwc_te, x_u8, padding, int(pad_value), primfunc_name_hint="hago_pad_nchwc")
    else:
        wp = weights.pack(w, groups, None)
        b = weights.in_block(wp)
        cp = int(wp.shape[1]) * b * groups
        data = bb.emit_te(_to_nchwc_te, x_u8, cp, b, padding, int(pad_value), primfunc_name_hint="hago_nchw_to_nchwc")
    kernel = relax.const(wp, weights.dtype)
    if out_layout == BLOCKED:
        def fused(d, k, bias, mult, half, shift):  # emit_te takes tensors and numbers, not a Requant
            return weights.conv_requant(d, k, bias, mult, half, shift, _pair(strides), _pair(dilation), 1, requant)

        return bb.emit_te(fused, data, kernel, *requant.constants(int(wp.shape[0]) * LANES),
                          primfunc_name_hint=weights.name)
    acc = bb.emit_te(weights.conv, data, kernel, _pair(strides), _pair(dilation), groups,
                     primfunc_name_hint=weights.name)
    if relax_back and requant is None and groups == 1 and int(wp.shape[0]) * LANES == o:
        return bb.emit(O.layout_transform(acc, lambda n, c, h, w, lane: (n, c * LANES + lane, h, w)))
    if requant is not None:  # requantize in the NCHW16c -> NCHW write-back: no int32 NCHW pass
        def back(a, bias, mult, half, shift):  # emit_te takes tensors and numbers, not a Requant
            return _from_nchwc_requant_te(a, o, bias, mult, half, shift, requant)

        return bb.emit_te(back, acc, *requant.constants(o), primfunc_name_hint="hago_nchwc_to_nchw")
    return bb.emit_te(_from_nchwc_te, acc, o, primfunc_name_hint="hago_nchwc_to_nchw")
