"""bf16 dense / conv2d on x86 ``avx512bf16`` layouts, emitted as named TE kernels.

Weights and activations are bfloat16, products accumulate in fp32 through
``vdpbf16ps`` (see ``bf16_intrin``): 16 fp32 lanes, each += the dot product of
a pair of adjacent bf16 values with a pair of weights. The layouts are the
VNNI ones (``vnni``) with pairs in place of quadruples, packed at compile
time in numpy (weights rounded to bf16 to nearest even with ``ml_dtypes``):

* dense ``[K, N] -> [N/16, K/2, 16, 2]``;
* conv ``OIHW -> OIHW{b/2}i16o2i`` (``b`` the input channel block, the
  largest of 16/8/4/2 dividing the channels) with activations in
  ``NCHW{b}c``.

K, N, C and O are padded with zero weights up to the block sizes and the
output keeps the plain op's shape. Inputs and outputs are fp32 (bf16 inputs
are accepted too); the fp32 -> bf16 conversion of the activation is fused
into the block that packs it (``NCHW -> NCHW{b}c`` with the spatial padding,
or the K padding of dense). That conversion is TVM's ``cast``, which rounds
to nearest even (``bits + 0x7FFF + lsb >> 16`` on the fp32 bits; NaN is not
special-cased). The bias (fp32) is added in the kernel's write-back.

Numerics: the products of bf16 values are exact in fp32, so the result
differs from an fp32 sum of the rounded inputs only by the order of the
additions. ``vdpbf16ps`` treats bf16 denormals as zero and flushes denormal
results (it ignores MXCSR).

Speed: the register tiles keep ``vdpbf16ps`` issuing back to back, so the
kernels run at whatever rate the CPU gives that instruction. On this
project's Xeon (Sapphire Rapids class, KVM) it issues once every 2 cycles at
any vector width: 51 GMAC/s per core, half the fp32 FMA peak (103), so there
these kernels are no faster than good fp32 code and only halve the weight
bytes. AMX ``tdpbf16ps`` measured 1160 GMAC/s per core on the same machine.

Grouped convs qualify when each group has an even number of input channels
and a multiple of 16 output channels. Depthwise convs do not (one input
channel per group would pad to 2 x 16): a bf16 depthwise conv is bf16
storage with fp32 arithmetic (``cpu.float_kernels``).

Blocked layouts (one group only), the ones the build's float layout pass
gives a bf16 conv (:mod:`.bf16_blocked`): a 5-D ``x`` is ``NCHW{b}c`` (fp32
or bf16) with ``b`` the kernel's own input block and no padded channels, or
an RGB stem's one ``NCHW3c`` block; ``out_layout="NCHW16c"`` returns the
result blocked with the bias (then a residual, a clip and the cast to bf16)
applied on the register tiles, in 16-channel blocks (padded channels 0) or,
``out_block`` 8 or 4, in smaller ones. A bf16 input (the previous conv's
bf16 output) that needs spatial zero padding is padded inside the conv's own
kernel, each tile's rows of one channel block just before the tile reads
them (:func:`_conv_bias_te`'s ``padding``), not in a pass of its own: on ResNet-18
that removes 15 of its 41 kernel calls per image (outputs bit-identical).

Every kernel block carries the annotation ``hago.kernel`` naming its
schedule (``bf16_schedule``); ``schedules.schedule_vnni`` finds them by it
and schedules the ``vdpbf16ps`` ones only for targets with ``avx512bf16``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax import op as O

from hago.errors import QuantizeError
from hago.tvm_consts import KERNEL_ATTR

from . import vnni
from .vnni import BLOCKED, _pair

DENSE_BF16 = "dense_bf16"
CONV_BF16 = "conv2d_nchwc_bf16"
TO_BF16 = "to_bf16"  # dense input: fp32 [M, K] -> bf16 [M, Kp]
TO_NCHWC_BF16 = "nchw_to_nchwc_bf16"  # conv input: fp32 NCHW -> bf16 NCHW{b}c, spatially padded
PAD_NCHWC_BF16 = "pad_nchwc_bf16"  # blocked conv input: fp32 NCHW16c -> bf16, spatially padded
FROM_NCHWC_F32 = "nchwc_to_nchw_f32"  # conv output: fp32 NCHW16c -> NCHW (+ bias)
BIAS_EPILOGUE = "hago_bf16_bias"  # write-back of a register tile: + bias, padding dropped
CAST_EPILOGUE = "hago_bf16_bias_cast"  # a second output of the write-back: its value cast (bf16 for the next layer)
BF16 = "bfloat16"
#: a blocked bf16 conv pads its bf16 input inside its own kernel (each tile's rows, :func:`_conv_bias_te`)
#: rather than in a ``PAD_NCHWC_BF16`` pass; off only to measure what it saves (benchmarks/ab_bf16_epilogue.py)
PAD_INSIDE = True
LANES, RED = 16, 2  # vdpbf16ps: 16 fp32 output lanes, 2 bf16 reduced per lane


def to_bf16(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16 (nearest even; ``ml_dtypes``), the way the kernels round their inputs."""
    return np.asarray(a).astype(ml_dtypes.bfloat16)


def in_block(c_per_group: int) -> int:
    """Input channel block: VNNI's rule with pairs: the largest of 16/8/4/2 dividing the 2-padded channels."""
    return vnni.in_block(c_per_group, RED)


def bf16_applicable(kind: str, x_shape, w_shape, groups: int = 1) -> bool:
    """Whether ``emit_dense_bf16`` / ``emit_conv2d_bf16`` handles this layer: VNNI's rule with pairs.

    Grouped convs qualify when every group has an even number of input and a
    multiple of 16 output channels; depthwise does not (see the module docstring).
    """
    return vnni.vnni_applicable(kind, x_shape, w_shape, groups, RED)


# ---- weight packing (numpy, at compile time): VNNI's layouts with pairs, rounded to bf16 ------------------
def pack_dense_weight(w_kn: np.ndarray) -> np.ndarray:
    """fp32 ``[K, N] -> bf16 [Np/16, Kp/2, 16, 2]``, zero-padded to multiples of 2 / 16."""
    return vnni.pack_dense_weight(to_bf16(w_kn), RED)


def pack_conv_weight(w_oihw: np.ndarray, groups: int = 1, in_channels: int | None = None) -> np.ndarray:
    """fp32 ``[O, I, KH, KW] -> bf16 [Op/16, Ip/b, KH, KW, b/2, 16, 2]`` (see ``vnni.pack_conv_weight``)."""
    return vnni.pack_conv_weight(to_bf16(w_oihw), groups, in_channels, RED)


# ---- TE kernels -------------------------------------------------------------
def _bf16(value):
    return value if str(value.dtype) == BF16 else value.astype(BF16)


def _bf16_zero():
    """bf16 0 as the bits of a ``uint16``: a ``bfloat16`` literal that a schedule makes a vectorized fill of
    (``decompose_padding``) reaches TVM's ``BF16StorageLegalize`` as a bf16 broadcast, which it cannot store."""
    return tirx.reinterpret(BF16, tirx.const(0, "uint16"))


def _to_bf16_te(a, kp):
    """``[M, K]`` fp32 -> bf16 ``[M, kp]``, the K padding zero."""
    m, k = (int(s) for s in a.shape)

    def body(i, j):
        if kp == k:
            return _bf16(a[i, j])
        return tirx.if_then_else(j < k, _bf16(a[i, tirx.min(j, k - 1)]), _bf16_zero())

    return te.compute((m, kp), body, name=TO_BF16, attrs={KERNEL_ATTR: TO_BF16})


def _dense_te(a, wp):
    m, kp = (int(s) for s in a.shape)
    np_ = int(wp.shape[0]) * LANES
    k = te.reduce_axis((0, kp), name="k")
    return te.compute(
        (m, np_),
        lambda i, j: te.sum(
            a[i, k].astype("float32") * wp[j // LANES, k // RED, j % LANES, k % RED].astype("float32"), axis=k
        ),
        name=DENSE_BF16,
        attrs={KERNEL_ATTR: DENSE_BF16},
    )


def _dense_bias_te(a, wp, n, bias=None):
    """The dense and its write-back (``+ bias``, the N padding dropped) as one PrimFunc."""
    acc = _dense_te(a, wp)
    m = int(acc.shape[0])
    if bias is None:
        return te.compute((m, n), lambda i, j: acc[i, j], name=BIAS_EPILOGUE)
    return te.compute((m, n), lambda i, j: acc[i, j] + bias[j], name=BIAS_EPILOGUE)


def _to_nchwc_te(x, cp, b, padding):
    """fp32 NCHW -> bf16 NCHW{b}c: channels zero-padded up to ``cp``, spatial zero padding ``(t, l, b, r)``."""
    n, c, h, w = (int(s) for s in x.shape)
    top, left, bottom, right = padding

    def body(i, cc, y, z, cb):
        conds = []
        if cp != c:
            conds.append(cc * b + cb < c)
        if any(padding):
            conds += [y >= top, y < top + h, z >= left, z < left + w]
        if not conds:
            return _bf16(x[i, cc * b + cb, y, z])
        ch = cc * b + cb if cp == c else tirx.min(cc * b + cb, c - 1)
        return tirx.if_then_else(tirx.all(*conds), _bf16(x[i, ch, y - top, z - left]), _bf16_zero())

    return te.compute((n, cp // b, h + top + bottom, w + left + right, b), body, name=TO_NCHWC_BF16,
                      attrs={KERNEL_ATTR: TO_NCHWC_BF16})


def _pad_nchwc_te(x, padding, block=None, bits=False):
    """Blocked ``[N, C/b, H, W, b]`` -> bf16, spatially zero-padded by ``(top, left, bottom, right)``.

    ``block``: a wider channel block for a one-block input (an RGB stem's
    ``NCHW3c`` -> ``NCHW4c``), the extra channels zero. ``bits``: a conv's
    padding of its own bf16 input, inside its kernel (:func:`_conv_bias_te`'s
    ``padding``): the values as ``uint16`` bits, since TVM would store a bf16
    buffer of the kernel's own as fp32 (:mod:`.bf16_intrin`), and not a kernel
    of its own (the conv's schedule places it).
    """
    n, cc, h, w, b = (int(s) for s in x.shape)
    top, left, bottom, right = padding
    block = b if block is None else int(block)
    if block != b and cc != 1:
        raise QuantizeError(f"bf16 padding: widening the channel block {b} -> {block} needs one block, got {cc}")

    def value(v):
        return tirx.reinterpret("uint16", v) if bits else _bf16(v)

    def body(i, c, y, z, l):
        conds = [l < b] if block != b else []
        if any(padding):
            conds += [y >= top, y < top + h, z >= left, z < left + w]
        lane = l if block == b else tirx.min(l, b - 1)
        if not conds:
            return value(x[i, c, y, z, lane])
        zero = tirx.const(0, "uint16") if bits else _bf16_zero()
        return tirx.if_then_else(tirx.all(*conds), value(x[i, c, y - top, z - left, lane]), zero)

    return te.compute((n, cc, h + top + bottom, w + left + right, block), body, name=PAD_NCHWC_BF16,
                      attrs={} if bits else {KERNEL_ATTR: PAD_NCHWC_BF16})


def _conv_te(data, kernel, strides, dilation, groups):
    return vnni.blocked_conv_te(data, kernel, strides, dilation, groups, "float32", CONV_BF16)


def _clipped(v, clip):
    """``v`` kept within ``clip`` = ``(lo, hi)`` (either None or infinite: no bound), the relu/clip a write-back
    absorbs."""
    if clip is None:
        return v
    lo, hi = (None if b is None or np.isinf(b) else float(b) for b in clip)
    v = v if lo is None else te.max(v, tirx.const(lo, "float32"))
    return v if hi is None else te.min(v, tirx.const(hi, "float32"))


def _conv_bias_te(data, kernel, bias, strides, dilation, clip=None, out_dtype="float32", out_block=LANES, o=None,
                  residual=None, padding=None):
    """The conv with its bias add (then ``residual``, then ``clip``, then the cast to ``out_dtype``) as a second
    block of the same PrimFunc, computed on each register tile.

    ``out_dtype`` a tuple of dtypes starting with ``"float32"`` (``("float32", "bfloat16")``): one output per
    dtype, the first as above and the others its casts (``CAST_EPILOGUE`` blocks, written on the same tile),
    for a value that both an fp32 user (a later residual add) and the next bf16 layer read; a separate cast
    would be one more pass over it.

    ``out_block`` < 16 (``o`` channels, a multiple of it): the result in ``NCHW{out_block}c`` with no padded
    channels, for neighbours whose channel count is not a multiple of 16 (24, 40 in EfficientNet).

    ``padding`` ``(top, left, bottom, right)``: bf16 ``data``'s zero padding, inside this kernel; its schedule
    pads each tile's input rows of one channel block just before the tile reads them
    (:func:`.bf16_schedule.schedule_conv_bf16`): no pass over the whole input and no kernel call of its own.
    """
    if padding is not None:
        data = _pad_nchwc_te(data, padding, bits=True)
    acc = _conv_te(data, kernel, strides, dilation, 1)
    n, occ, oh, ow, _ = (int(s) for s in acc.shape)
    o = occ * LANES if o is None else int(o)

    def body(i, c, y, x, l):
        ch = c * out_block + l
        v = acc[i, ch // LANES, y, x, ch % LANES] + bias[ch]
        if residual is not None:
            v = v + residual[i, c, y, x, l]
        v = _clipped(v, clip)
        return v if dtypes[0] == "float32" else v.astype(dtypes[0])

    dtypes = (out_dtype,) if isinstance(out_dtype, str) else tuple(out_dtype)
    shape = acc.shape if out_block == LANES else (n, o // out_block, oh, ow, out_block)
    first = te.compute(shape, body, name=BIAS_EPILOGUE)
    if len(dtypes) == 1:
        return first
    return [first] + [_cast_te(first, d) for d in dtypes[1:]]


def _cast_te(t, dtype):
    """``t`` cast to ``dtype``, the write-back's second output (``CAST_EPILOGUE``)."""
    return te.compute(t.shape, lambda *i: t(*i).astype(dtype), name=CAST_EPILOGUE)


def _from_nchwc_te(acc, o, bias=None):
    """fp32 NCHW16c -> NCHW with ``o`` channels, ``+ bias[c]``."""
    n, _, h, w, ob = (int(s) for s in acc.shape)

    def body(i, c, y, z):
        v = acc[i, c // ob, y, z, c % ob]
        return v if bias is None else v + bias[c]

    return te.compute((n, o, h, w), body, name=FROM_NCHWC_F32, attrs={KERNEL_ATTR: FROM_NCHWC_F32})


# ---- Relax emitters ---------------------------------------------------------
def _float_shape(bb: relax.BlockBuilder, expr: relax.Expr, what: str) -> list[int]:
    ty = bb.normalize(expr).ty
    if str(ty.dtype) not in ("float32", BF16):
        raise QuantizeError(f"{what}: bf16 kernels take float32 or bfloat16 activations, got {ty.dtype}")
    try:
        return [int(s) for s in ty.shape.values]
    except (TypeError, AttributeError):
        raise QuantizeError(f"{what}: bf16 kernels need a static input shape, got {ty.shape}") from None


def _weight(w: np.ndarray, what: str) -> np.ndarray:
    w = np.asarray(w)
    if w.dtype.kind != "f" and w.dtype != ml_dtypes.bfloat16:
        raise QuantizeError(f"{what}: bf16 kernels take float weights (numpy), got {w.dtype}")
    return w


def _const(a: np.ndarray) -> relax.Constant:
    return relax.const(tvm.runtime.tensor(a))


def _bias_const(bias, n: int, padded: int, what: str) -> relax.Constant:
    """fp32 ``[padded]`` bias, zero beyond ``n``."""
    b = np.asarray(bias, np.float32).reshape(-1)
    if b.shape != (n,):
        raise QuantizeError(f"{what}: bias has {b.size} values for {n} outputs")
    out = np.zeros(padded, np.float32)
    out[:n] = b
    return _const(out)


def emit_dense_bf16(bb: relax.BlockBuilder, x: relax.Expr, w_kn: np.ndarray, bias=None) -> relax.Expr:
    """fp32 ``x @ w (+ bias)`` for fp32 ``x [..., K]`` and numpy ``w [K, N]``, in bf16 through ``vdpbf16ps``.

    ``x`` and ``w`` are rounded to bf16 (nearest even), the products summed in
    fp32. Leading dims of ``x`` are flattened into M and restored.
    """
    xs = _float_shape(bb, x, "dense")
    w = _weight(w_kn, "dense")
    if not bf16_applicable("dense", xs, w.shape):
        raise QuantizeError(f"dense {xs} x {list(w.shape)}: shapes do not match")
    k, n = w.shape
    wp = pack_dense_weight(w)
    kp = int(wp.shape[1]) * RED
    a = x if len(xs) == 2 else bb.emit(O.reshape(x, (-1, k)))
    if kp != k or str(bb.normalize(x).ty.dtype) != BF16:
        a = bb.emit_te(_to_bf16_te, a, kp, primfunc_name_hint="hago_to_bf16")
    args = [a, _const(wp), n]
    if bias is not None:
        args.append(_bias_const(bias, n, n, "dense"))
    out = bb.emit_te(_dense_bias_te, *args, primfunc_name_hint="hago_dense_bf16")
    if len(xs) != 2:
        out = bb.emit(O.reshape(out, (*xs[:-1], n)))
    return out


def emit_conv2d_bf16(bb: relax.BlockBuilder, x: relax.Expr, w_oihw: np.ndarray, strides=(1, 1),
                     dilation=(1, 1), groups: int = 1, padding=(0, 0, 0, 0), bias=None,
                     out_layout: str = "NCHW", clip=None, out_dtype: str | tuple[str, ...] = "float32",
                     out_block: int = LANES, residual: relax.Expr | None = None) -> relax.Expr:
    """fp32 NCHW ``conv2d(x, w) (+ bias)`` in bf16 through ``vdpbf16ps``.

    ``x`` is fp32 (or bf16) NCHW, ``w`` numpy OIHW (rounded to bf16 here),
    ``padding`` ``(top, left, bottom, right)`` zeros, applied by the
    NCHW -> NCHW{b}c conversion that also rounds ``x`` to bf16 (no padded
    fp32 copy). Matches ``conv2d(x, w, strides, padding, dilation, groups)``
    of the bf16-rounded inputs up to the order of the fp32 additions. Check
    ``bf16_applicable`` first.

    Blocked layouts (one group only, see the module docstring): a 5-D ``x``
    is taken as ``NCHW{b}c`` with ``b`` the kernel's input block
    (:func:`in_block` of its channels: 16, 8 or 4 for channels in 4s), and
    ``out_layout="NCHW16c"`` returns the blocked result, the bias added on
    the kernel's register tiles and the result cast to ``out_dtype``
    (``"bfloat16"``: the next bf16 layer's input, rounded to nearest even;
    a tuple of dtypes: one output each, returned as a Relax tuple);
    ``out_block`` 8 or 4 writes ``NCHW{out_block}c`` instead (channels not
    in 16s), from the same 16-lane tiles. ``residual``: an fp32 tensor of
    the blocked output's shape, added after the bias and before ``clip`` (a
    skip connection, in the same write-back).

    ``clip`` ``(lo, hi)`` (either None: unbounded; blocked output only): a
    relu / clip applied in the same write-back as the bias (a relu6 after the
    conv costs no pass).
    """
    blocked_in = len(bb.normalize(x).ty.shape.values) == 5
    xs = _float_shape(bb, x, "conv2d")
    w = _weight(w_oihw, "conv2d")
    groups = int(groups)
    logical = [xs[0], w.shape[1] * groups, xs[2], xs[3]] if blocked_in else xs
    if not bf16_applicable("conv2d", logical, w.shape, groups):
        raise QuantizeError(f"conv2d {xs} x {list(w.shape)} groups={groups} has no bf16 layout; "
                            "check bf16_applicable first")
    if out_layout not in ("NCHW", BLOCKED):
        raise QuantizeError(f"conv2d: out_layout {out_layout!r} must be 'NCHW' or 'NCHW16c'")
    if (blocked_in or out_layout != "NCHW") and groups != 1:
        raise QuantizeError(f"conv2d {xs}: blocked layouts need one group")
    stem = blocked_in and xs[1] == 1 and xs[4] == w.shape[1] < in_block(w.shape[1])  # NCHW3c: widened to 4
    if blocked_in and (xs[4] * xs[1] != w.shape[1] or (in_block(w.shape[1]) != xs[4] and not stem)):
        raise QuantizeError(f"conv2d {xs} x {list(w.shape)}: a blocked input needs the kernel's input block "
                            f"{in_block(w.shape[1])} (or one narrower block of all channels) and no padded channels")
    if (out_dtype != "float32" or out_block != LANES or residual is not None or clip is not None) and (
            out_layout != BLOCKED):
        raise QuantizeError("conv2d: out_dtype, out_block, residual and clip need out_layout NCHW16c")
    if not isinstance(out_dtype, str) and (len(out_dtype) < 2 or out_dtype[0] != "float32"):
        raise QuantizeError(f"conv2d: out_dtype {out_dtype}: a tuple of dtypes starts with float32, the others are "
                            "its casts")
    if out_block not in (4, 8, LANES) or (out_block != LANES and w.shape[0] % out_block):
        raise QuantizeError(f"conv2d: out_block {out_block} must be 16 (channels padded), or 4 or 8 dividing "
                            f"{w.shape[0]} channels")
    o = int(w.shape[0])
    padding = tuple(int(p) for p in padding)
    pad_inside = False
    if blocked_in:
        wp = pack_conv_weight(w, 1)
        data = x
        pad_inside = (PAD_INSIDE and out_layout == BLOCKED and any(padding) and not stem
                      and str(bb.normalize(x).ty.dtype) == BF16)
        if not pad_inside and (any(padding) or stem or str(bb.normalize(x).ty.dtype) != BF16):
            data = bb.emit_te(_pad_nchwc_te, x, padding, in_block(w.shape[1]),
                              primfunc_name_hint="hago_pad_nchwc_bf16")
    else:
        wp = pack_conv_weight(w, groups)
        b = int(wp.shape[4]) * RED
        cp = int(wp.shape[1]) * b * groups
        data = bb.emit_te(_to_nchwc_te, x, cp, b, padding, primfunc_name_hint="hago_nchw_to_nchwc_bf16")
    kernel = _const(wp)
    op = int(wp.shape[0]) * LANES
    if out_layout == BLOCKED:
        bias_p = _bias_const(np.zeros(o) if bias is None else bias, o, op, "conv2d")
        return bb.emit_te(_conv_bias_te, data, kernel, bias_p, _pair(strides), _pair(dilation), clip, out_dtype,
                          out_block, o, residual, padding if pad_inside else None,
                          primfunc_name_hint="hago_conv2d_nchwc_bf16")
    acc = bb.emit_te(_conv_te, data, kernel, _pair(strides), _pair(dilation), groups,
                     primfunc_name_hint="hago_conv2d_nchwc_bf16")
    bias_c = None if bias is None else _bias_const(bias, o, o, "conv2d")
    return bb.emit_te(_from_nchwc_te, acc, o, bias_c, primfunc_name_hint="hago_nchwc_to_nchw_f32")
