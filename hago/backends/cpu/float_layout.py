"""Blocked ``NCHW{b}c`` layouts for the float convolutions of a module, chosen per layer.

A float conv in plain NCHW has no loop whose loads are contiguous in the
output channel, so TVM's naive code runs one multiply-add at a time. In the
blocked layout the innermost ``b`` channels are one vector register: a
convolution becomes ``rows x channel-blocks`` register tiles of FMAs (the
schedule in :mod:`.float_schedule`), as in TOPI's old ``conv2d_NCHWc`` x86
schedules and in MLAS's NCHWc kernels.

Relax's ``ConvertLayout`` does the rewriting and carries the layout through
the element-wise ops, adds, pools, means and concats between convolutions, so
a chain of float layers changes layout only where an op needs plain NCHW
(a reshape, a softmax over channels). This module only decides, per conv,
which block its channels allow: ``lanes`` (the target's float vector width)
where they divide it, then halves of it down to 4; a first layer with fewer
channels than a vector (RGB: 3) takes all of them as one block. A conv whose
channels fit none of these stays plain NCHW and keeps the generic schedule.

ConvertLayout converts each op from its input's layout and never removes a
transform followed by its inverse; :mod:`.layout_pairs` does, afterwards, so
the blocked tensors of an integer plan (x86 NCHW16c) meet the blocked float
layers without an NCHW pass between them.
"""

from __future__ import annotations

import logging
from typing import Callable

import tvm
from tvm import relax

from hago.errors import error_line

from .layout_pairs import cancel_layout_pairs

log = logging.getLogger(__name__)

MIN_BLOCK = 4  # below this a "vector" is too narrow to pay for a layout change


def channel_block(channels: int, lanes: int) -> int | None:
    """The largest of ``lanes``, ``lanes/2`` ... ``MIN_BLOCK`` dividing ``channels``; None when none does."""
    b = lanes
    while b >= MIN_BLOCK:
        if channels % b == 0:
            return b
        b //= 2
    return None


#: a conv's plain layouts: data, kernel, output
PLAIN = ("NCHW", "OIHW", "NCHW")


def _plain(call) -> bool:
    a = call.attrs
    return (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) == PLAIN


def conv_layouts(call, lanes: int, bf16: bool = False, bf16_stem: Callable | None = None) -> list[str] | None:
    """``[data, kernel, out]`` layouts for a float NCHW/OIHW ``relax.nn.conv2d`` call; None: keep it plain.

    ``bf16``: the backend also has a blocked kernel for convs on bfloat16
    operands (AMX, AVX-512 BF16): those get blocks too, single-group ones and
    depthwise (whose blocked float kernel reads bf16 storage).
    ``bf16_stem(call)``: whether a bf16 conv with fewer input channels than a
    block takes them all as one (a backend with a kernel for such a stem, AMX's
    ``stem_bf16``); without it such a conv stays plain.
    """
    if not _plain(call):
        return None
    a = call.attrs
    x, w = call.args[0].ty, call.args[1].ty
    dtypes = {str(x.dtype), str(w.dtype)}
    groups = int(a.groups)
    depthwise = groups > 1 and int(w.shape[1]) == 1 and int(w.shape[0]) == groups
    stored = str(x.dtype) == "bfloat16" and str(w.dtype) == "float32"  # a bf16 depthwise: bf16 storage only
    if dtypes != {"float32"} and not (bf16 and ((dtypes == {"bfloat16"} and groups == 1) or (depthwise and (
            dtypes == {"bfloat16"} or stored)))):
        return None
    try:
        c, o, i = int(x.shape[1]), int(w.shape[0]), int(w.shape[1])
    except (TypeError, AttributeError):  # symbolic channels
        return None
    groups = int(a.groups)
    if groups == c and i == 1 and o == c:  # depthwise: one block for data, weights and output
        b = channel_block(c, lanes)
        return None if b is None else [f"NCHW{b}c", f"OIHW1i{b}o", f"NCHW{b}c"]
    ob = channel_block(o // groups, lanes)
    narrow = groups == 1 and i < MIN_BLOCK and ("float32" in dtypes or (bf16_stem is not None and bf16_stem(call)))
    ib = channel_block(i, lanes) or (i if narrow else None)
    if ob is None or ib is None:
        return None
    return [f"NCHW{ib}c", f"OIHW{ib}i{ob}o", f"NCHW{ob}c"]


def _float_value(v) -> float | None:
    """The number a clip bound holds (a ``FloatImm``/``IntImm``, or a PrimValue around one); None if symbolic."""
    for _ in range(3):
        if isinstance(v, (int, float)):
            return float(v)
        v = getattr(v, "value", None)
    return None


def _clip_to_minmax(mod: tvm.IRModule) -> tvm.IRModule:
    """Float ``clip(x, lo, hi)`` -> ``minimum(maximum(x, lo), hi)``.

    ConvertLayout carries binary ops through a blocked layout but converts
    back to NCHW around ``clip``, which is ReLU6 in every mobile net.
    """
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from hago.relax_rewrite import rewrite_relax_functions

    clip = tvm.ir.Op.get("relax.clip")

    @mutator
    class Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(clip)):
                return call
            dtype = str(call.ty.dtype) if hasattr(call.ty, "dtype") else ""
            lo, hi = call.args[1], call.args[2]
            bounds = [_float_value(v) for v in (lo, hi)]
            if dtype != "float32" or None in bounds:
                return call
            x = relax.op.maximum(call.args[0], relax.const(bounds[0], "float32"))
            return relax.op.minimum(x, relax.const(bounds[1], "float32"))

    return rewrite_relax_functions(mod, Rewrite(mod))


def _means_keeping_dims(mod: tvm.IRModule) -> tvm.IRModule:
    """Float ``mean(x, axes, keepdims=False)`` -> ``squeeze(mean(x, axes, keepdims=True), axes)``.

    ConvertLayout's layout inference aborts the whole pass on a mean that
    drops the axes of a blocked tensor when a row reduction follows it
    (``x.mean([2, 3])`` into a dense quantized per row at run time, MNASNet's
    head: "Cannot broadcast from 3 to 2"). With the dims kept the mean stays
    blocked and only the squeeze converts back.
    """
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from hago.relax_rewrite import rewrite_relax_functions

    mean = tvm.ir.Op.get("relax.mean")

    @mutator
    class Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if (not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(mean)) or call.attrs.axis is None
                    or bool(call.attrs.keepdims)):
                return call
            axes = [int(a) for a in call.attrs.axis]
            return relax.op.squeeze(relax.op.mean(call.args[0], axes, keepdims=True), axes)

    return rewrite_relax_functions(mod, Rewrite(mod))


def _squeezes_with_positive_axes(mod: tvm.IRModule) -> tvm.IRModule:
    """``squeeze(x, axis=[-k])`` -> ``squeeze(x, axis=[ndim - k])``.

    ConvertLayout's squeeze layout inference dies on a negative axis
    (``std::bad_alloc``) and takes the whole module with it: ViT-B/32 as
    ``torch.onnx.export`` writes it squeezes its attention's packed q/k/v
    with ``axis=-2``, and its patch-embedding conv (67 ms of 150) ran NCHW.
    """
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from hago.relax_rewrite import rewrite_relax_functions

    squeeze = tvm.ir.Op.get("relax.squeeze")

    @mutator
    class Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(squeeze)) or call.attrs.axis is None:
                return call
            axes = [int(a) for a in call.attrs.axis]
            ndim = getattr(call.args[0].ty, "ndim", -1)
            if all(a >= 0 for a in axes) or ndim < 0:
                return call
            return relax.op.squeeze(call.args[0], [a % ndim for a in axes])

    return rewrite_relax_functions(mod, Rewrite(mod))


#: ops whose layout inference in ConvertLayout aborts on an input that is already blocked (5-d)
_NO_BLOCKED_INPUT = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d")


def _legalize_blocked_pools(mod: tvm.IRModule) -> tvm.IRModule:
    """Legalize, ahead of ConvertLayout, the pools an integer plan already runs on a blocked tensor.

    ConvertLayout assumes every pool starts in a 4-d layout and aborts the
    whole pass on the x86 plan's NCHW16c max-pools; as PrimFuncs they are
    opaque to it and keep their layout.
    """
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from hago.relax_rewrite import rewrite_relax_functions

    @mutator
    class Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if name in _NO_BLOCKED_INPUT and len(call.args[0].ty.shape) != 4:
                return tvm.ir.Op.get(name).get_attr("FLegalize")(self.builder_, call)
            return call

    return rewrite_relax_functions(mod, Rewrite(mod))


def _calls(mod: tvm.IRModule, op_name: str) -> list:
    """Every call of ``op_name`` in the module's Relax functions."""
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == op_name:
            found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def block_float_convs(mod: tvm.IRModule, lanes: int, bf16: bool = False,
                      bf16_stem: Callable | None = None) -> tvm.IRModule:
    """``mod`` with its float convs in blocked layouts (weights re-laid out as constants); ``mod`` on failure.

    ``bf16``, ``bf16_stem``: bf16 convs too (a backend with a blocked bf16 conv kernel; see :func:`conv_layouts`).
    """
    conv2d = "relax.nn.conv2d"

    def layout_cb(call):
        if getattr(call.op, "name", "") != conv2d:
            return {}
        layouts = conv_layouts(call, lanes, bf16, bf16_stem)
        if layouts:
            return {conv2d: layouts}
        if _plain(call):
            # stated, not left empty: given no layout, ConvertLayout infers one from a blocked input and
            # aborts on a conv no block fits (EfficientNet-B0's squeeze-excitation: 144 -> 6 channels)
            return {conv2d: list(PLAIN)}
        return {}

    if not any(conv_layouts(call, lanes, bf16, bf16_stem) for call in _calls(mod, conv2d)):
        return mod  # nothing to block (an all-integer program): leave it exactly as it is
    try:
        converted = relax.transform.ConvertLayout({}, layout_cb)(
            _legalize_blocked_pools(_squeezes_with_positive_axes(_means_keeping_dims(_clip_to_minmax(mod)))))
        converted = relax.transform.FoldConstant()(converted)
    except Exception as e:  # an op ConvertLayout cannot carry: the plain layout is slow, not wrong
        log.warning("float convs stay NCHW (blocked layout conversion failed): %s", error_line(e, limit=None))
        return mod
    try:
        return cancel_layout_pairs(converted)
    except Exception as e:  # the round trips stay: as many passes as before, the same values
        log.warning("layout round trips kept (their removal failed): %s", error_line(e, limit=None))
        return converted
