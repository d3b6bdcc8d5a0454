"""Float convolutions in blocked ``NCHW{b}c`` layouts, as TE kernels the default schedules recognise.

:mod:`.float_layout` puts a float conv in ``NCHW{ib}c`` data,
``OIHW{ib}i{ob}o`` weights and ``NCHW{ob}c`` output (``OIHW1i{b}o`` for a
depthwise one). TVM's own legalization of such a call is a generic loop nest;
this one is hago's: one padding block and one reduction block annotated
``hago.kernel`` (``CONV`` or ``DEPTHWISE``), with the loop order
:mod:`.float_schedule` expects (``n, oc, oh, ow, ob`` then ``ic, kh, kw, ib``).
Element-wise consumers (bias, ReLU, residual add) fuse into the same PrimFunc
(``op_pattern`` stays out-element-wise fusable) and the schedule computes them
on the register tile, as TOPI did.
"""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax, te, topi

from hago.tvm_consts import KERNEL_ATTR

CONV = "conv2d_nchwc_float"
DEPTHWISE = "depthwise_nchwc_float"
KINDS = (CONV, DEPTHWISE)

_DATA = re.compile(r"^NCHW(\d+)c$")
_KERNEL = re.compile(r"^OIHW(\d+)i(\d+)o$")


def blocked_layouts(attrs) -> tuple[int, int, int] | None:
    """``(ib, kernel_ob, ob)`` of a conv2d in hago's blocked float layouts; None for any other layout."""
    d, k, o = (_DATA.match(str(attrs.data_layout)), _KERNEL.match(str(attrs.kernel_layout)),
               _DATA.match(str(attrs.out_layout)))
    if not (d and k and o):
        return None
    return int(d.group(1)), int(k.group(2)), int(o.group(1))


def blocked_weight_to_oihw(w: np.ndarray) -> np.ndarray:
    """Relax ``OIHW{ib}i{ob}o`` ``[O/ob, C/ib, KH, KW, ib, ob]`` -> ``[O, C, KH, KW]`` (a blocked conv's weight
    back in the order a backend's own packing starts from)."""
    ocb, icb, kh, kw, ib, ob = w.shape
    return w.transpose(0, 5, 1, 4, 2, 3).reshape(ocb * ob, icb * ib, kh, kw)


def _padded_window(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation):
    """``(padded data, OH, OW, KH, KW)``: the spatial zero padding as a block of its own, and the output size."""
    h, w = (int(s) for s in data.shape[2:4])
    kh, kw = (int(s) for s in kernel.shape[2:4])
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    oh = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    if any(padding):
        data = topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], name="hago_pad")
    return data, oh, ow, kh, kw


def conv2d_nchwc(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation, groups: int) -> te.Tensor:
    """``data [N, C/ib, H, W, ib]`` x ``kernel [O/ob, Cg/ib, KH, KW, ib, ob]`` -> ``[N, O/ob, OH, OW, ob]``.

    ``Cg`` is the input channel count per group; every block lies inside one
    group (the layout choice makes ``ib | Cg`` and ``ob | O/groups``).
    """
    n, ib = data.shape[0], int(data.shape[4])  # the batch may be symbolic
    oc_chunks, ic_chunks, _, _, _, ob = (int(s) for s in kernel.shape)
    (sh, sw), (dh, dw) = strides, dilation
    data, oh, ow, kh, kw = _padded_window(data, kernel, strides, padding, dilation)
    chunks_per_group = oc_chunks // groups  # output blocks per group
    ic = te.reduce_axis((0, ic_chunks), name="ic")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    ri = te.reduce_axis((0, ib), name="ri")

    def body(b, oc, y, x, o):
        group_base = (oc // chunks_per_group) * ic_chunks if groups > 1 else 0
        return te.sum(data[b, group_base + ic, y * sh + ry * dh, x * sw + rx * dw, ri]
                      * kernel[oc, ic, ry, rx, ri, o], axis=[ic, ry, rx, ri])

    return te.compute((n, oc_chunks, oh, ow, ob), body, name=CONV, attrs={KERNEL_ATTR: CONV})


def depthwise_nchwc(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation) -> te.Tensor:
    """``data [N, C/b, H, W, b]`` x ``kernel [C/b, 1, KH, KW, 1, b]`` -> ``[N, C/b, OH, OW, b]``.

    bf16 ``data`` (a bf16 layer's stored input) is widened to fp32 on the way
    into the padded copy; the arithmetic is fp32 either way.
    """
    n, chunks, b = data.shape[0], int(data.shape[1]), int(data.shape[4])  # the batch may be symbolic
    if str(data.dtype) != "float32":
        src = data
        data = te.compute(src.shape, lambda *i: src(*i).astype("float32"), name="hago_widen")
    (sh, sw), (dh, dw) = strides, dilation
    data, oh, ow, kh, kw = _padded_window(data, kernel, strides, padding, dilation)
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    return te.compute(
        (n, chunks, oh, ow, b),
        lambda i, c, y, x, l: te.sum(data[i, c, y * sh + ry * dh, x * sw + rx * dw, l] * kernel[c, 0, ry, rx, 0, l],
                                     axis=[ry, rx]),
        name=DEPTHWISE, attrs={KERNEL_ATTR: DEPTHWISE})


def _ints(v) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


def legalize_conv2d(default):
    """A ``relax.nn.conv2d`` legalization: hago's kernels for float blocked layouts, ``default`` otherwise."""

    def legalize(bb, call):
        a = call.attrs
        blocks = blocked_layouts(a)
        x, w = call.args[0].ty, call.args[1].ty
        stored_bf16 = str(x.dtype) == "bfloat16" and str(w.dtype) in ("bfloat16", "float32")
        if (blocks is None or blocks[1] != blocks[2] or not (str(x.dtype) == str(w.dtype) == "float32" or stored_bf16)
                or (a.out_dtype and str(a.out_dtype) not in ("", "float32"))):
            return default(bb, call)
        try:  # every dim static but the batch (calibration and evaluation builds keep it symbolic)
            shapes = [1] + [int(s) for s in (*list(x.shape)[1:], *w.shape)]
        except TypeError:
            return default(bb, call)
        strides, padding, dilation, groups = _ints(a.strides), _ints(a.padding), _ints(a.dilation), int(a.groups)
        if len(padding) == 2:
            padding = padding * 2
        channels = shapes[1] * shapes[4]
        if groups > 1 and groups == channels and shapes[6] == 1 and shapes[9] == 1:  # depthwise, kernel OIHW1i{b}o
            weight = call.args[1]
            if str(w.dtype) != "float32":  # bf16 weight values, held as fp32 (exact): no widening per use
                if not isinstance(weight, tvm.ir.expr.Constant):
                    return default(bb, call)
                weight = relax.const(weight.value.numpy().astype(np.float32))
            return bb.call_te(depthwise_nchwc, call.args[0], weight, strides, padding, dilation,
                              primfunc_name_hint="conv2d_nchwc_dw")
        if stored_bf16:  # only the depthwise kernel reads bf16 storage
            return default(bb, call)
        return bb.call_te(conv2d_nchwc, call.args[0], call.args[1], strides, padding, dilation, groups,
                          primfunc_name_hint="conv2d_nchwc")

    return legalize
