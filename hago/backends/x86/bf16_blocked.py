"""bf16 convs of the float pipeline onto the ``vdpbf16ps`` kernels (AVX-512 BF16 without AMX).

Realize emits a bf16 conv as a plain ``relax.nn.conv2d`` on bfloat16
operands (:mod:`hago.realize.bf16`), so it takes part in the build's float
layout pass like any float conv (:mod:`..cpu.float_layout`, ``bf16=True``):
ConvertLayout puts it in ``NCHW{ib}c`` / ``OIHW{ib}i16o`` / ``NCHW16c`` and
carries that layout through the relu6s, residual adds and bf16 depthwise
convs between bf16 convs, so an inverted-residual block runs without an
``NCHW`` pass. Then

* :func:`x86_bf16_conv` is the ``find`` of :mod:`..cpu.bf16_epilogue`: the
  bias, a residual add, relu/relu6 and the cast to bf16 for the next bf16
  layer go into the kernel's register-tile write-back
  (``bf16._conv_bias_te``), so a bf16 conv
  feeding a bf16 conv stores bf16 and the next one reads it as it is (a
  pass of its own only to pad it spatially);
* :func:`lower_bf16_convs` turns what is left into the kernel: a blocked
  conv the finder takes, or a plain ``NCHW`` one (a grouped conv:
  ``bf16.emit_conv2d_bf16`` converts layouts in its own passes).

Both run before fusion; the kernels they make are opaque to FuseOps and get
their default schedules after it (``X86Backend.schedule_fused``).

A depthwise conv in bf16 is bf16 storage with fp32 arithmetic
(``cpu.float_kernels.depthwise_nchwc``): one channel per group has no pairs
for ``vdpbf16ps``, and its weights are 9 values per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..cpu.bf16_epilogue import bound_value, fp32_source
from ..cpu.float_kernels import blocked_layouts, blocked_weight_to_oihw
from . import bf16
from .vnni import BLOCKED, LANES


@dataclass(frozen=True)
class X86Bf16Conv:
    """A blocked bf16 ``relax.nn.conv2d`` the ``vdpbf16ps`` kernel takes: its data, output channels and block,
    and ``emit(bb, x, bias=None, clip=None, out_dtype="float32", residual=None)``, the kernel call on (the
    visited) ``x`` returning ``NCHW{ob}c``."""

    x: relax.Expr
    o: int
    ob: int
    emit: object


def _ints(v) -> tuple[int, ...]:
    return tuple(int(d) for d in v)


def _padding(attrs) -> tuple[int, ...]:
    """``(top, left, bottom, right)`` of a conv's padding attribute (two values: the same on both sides)."""
    p = _ints(attrs.padding)
    return p * 2 if len(p) == 2 else p


def narrow_stem(data_shape) -> bool:
    """Whether blocked data ``[N, 1, H, W, C]`` is a stem's one block of fewer channels than a block (RGB: 3),
    which the kernel's padding pass widens to its own input block (4)."""
    return data_shape[1] == 1 and data_shape[4] < 4


def nchw_stem_source(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr | None:
    """The ``NCHW`` tensor a stem's one-block input ``x`` (``NCHW3c``) was laid out from, as fp32 where it was
    only cast to bf16 on the way; None if ``x`` is not such a layout transform.

    The kernel's ``NCHW -> NCHW4c`` packing pass rounds, widens and pads in
    one go, so the cast, the layout transform and the padding pass (three
    passes over the image, 5% of an all-bf16 EfficientNet-Lite0's kernel
    time) become one.
    """
    value = bound_value(bb, x)
    if not (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.layout_transform"):
        return None
    src = value.args[0]
    try:
        ns, cs = _ints(src.ty.shape), _ints(x.ty.shape)
    except (TypeError, ValueError, AttributeError):
        return None
    if len(ns) != 4 or cs != (ns[0], 1, ns[2], ns[3], ns[1]):
        return None
    probe = (0, ns[1] - 1, ns[2] - 1, ns[3] - 1)  # one block: channel c of NCHW goes to lane c
    got = value.attrs.index_map.map_indices([tvm.tirx.IntImm("int64", v) for v in probe])
    if [int(v) for v in got] != [0, 0, ns[2] - 1, ns[3] - 1, ns[1] - 1]:
        return None
    cast = bound_value(bb, src)
    if (isinstance(cast, relax.Call) and getattr(cast.op, "name", "") == "relax.astype"
            and str(cast.args[0].ty.dtype) == "float32"):
        return cast.args[0]
    return src


def blocks_as_stem(call) -> bool:
    """``float_layout.conv_layouts``' ``bf16_stem``: a single-group bf16 conv with fewer than 4 input channels
    takes them as one block (:func:`narrow_stem`), so its output is blocked like its neighbours'."""
    return int(call.attrs.groups) == 1


def x86_bf16_conv(call: relax.Call) -> X86Bf16Conv | None:
    """The ``vdpbf16ps`` kernel for a blocked bf16 ``relax.nn.conv2d``; None if it does not take it.

    It takes one group, data ``NCHW{ib}c`` with ``ib`` the kernel's own input
    block (channels in 4s), a constant weight ``OIHW{ib}i{ob}o``, output
    ``NCHW{ob}c`` (``ob`` 16, or 8 / 4 for channels not in 16s) in fp32,
    static shapes.
    """
    if getattr(call.op, "name", "") != "relax.nn.conv2d":
        return None
    a = call.attrs
    blocks = blocked_layouts(a)
    x, w = call.args[0], call.args[1]
    if blocks is None or blocks[1] != blocks[2] or blocks[2] not in (4, 8, LANES) or int(a.groups) != 1:
        return None
    if not isinstance(w, tvm.ir.expr.Constant) or str(a.out_dtype) not in ("", "float32"):
        return None
    if str(x.ty.dtype) not in (bf16.BF16, "float32") or str(w.ty.dtype) not in (bf16.BF16, "float32"):
        return None
    try:
        xs = _ints(x.ty.shape)
    except (TypeError, ValueError):  # a symbolic batch (calibration builds): the generic legalization
        return None
    w_oihw = blocked_weight_to_oihw(w.value.numpy())
    c = xs[1] * xs[4]
    if c != w_oihw.shape[1] or (bf16.in_block(c) != xs[4] and not narrow_stem(xs)):
        return None
    strides, dilation, padding = _ints(a.strides), _ints(a.dilation), _padding(a)
    o = int(w_oihw.shape[0])

    def emit(bb, x, bias=None, clip=None, out_dtype="float32", residual=None):
        src = fp32_source(bb, x) if any(padding) or narrow_stem(xs) else x  # the padding pass rounds fp32 itself
        if narrow_stem(xs) and (nchw := nchw_stem_source(bb, x)) is not None:
            src = nchw
        return bf16.emit_conv2d_bf16(bb, src, w_oihw, strides, dilation, 1, padding, bias=bias,
                                     out_layout=BLOCKED, clip=clip, out_dtype=out_dtype, out_block=blocks[2],
                                     residual=residual)

    return X86Bf16Conv(x, o, blocks[2], emit)


def _plain_bf16_conv(bb, call, x) -> relax.Expr | None:
    """A bf16 conv ConvertLayout left in ``NCHW``/``OIHW`` (fewer channels than a block, or grouped): the kernel
    with its own layout passes, fp32 ``NCHW`` out."""
    a = call.attrs
    w = call.args[1]
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return None
    if not isinstance(w, tvm.ir.expr.Constant) or str(a.out_dtype) not in ("", "float32"):
        return None
    try:
        xs = list(_ints(call.args[0].ty.shape))
    except (TypeError, ValueError):
        return None
    w_oihw = np.asarray(w.value.numpy())
    groups = int(a.groups)
    if not bf16.bf16_applicable("conv2d", xs, w_oihw.shape, groups):
        return None
    return bf16.emit_conv2d_bf16(bb, x, w_oihw, _ints(a.strides), _ints(a.dilation), groups, _padding(a))


def lower_bf16_convs(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every bf16 ``relax.nn.conv2d`` the kernels take as their call (after
    :mod:`..cpu.bf16_epilogue` took those with an epilogue): blocked ones through :func:`x86_bf16_conv`, plain
    ones through :func:`_plain_bf16_conv`. The rest (bf16 depthwise storage) stays for the float
    legalization."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from hago.relax_rewrite import rewrite_relax_functions

    @mutator
    class _Lower(PyExprMutator):
        def visit_var_binding_(self, binding: relax.VarBinding) -> None:
            call = binding.value
            if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.nn.conv2d"
                    and str(call.args[0].ty.dtype) == bf16.BF16):
                return super().visit_var_binding_(binding)
            found = x86_bf16_conv(call)
            if found is not None:
                y = found.emit(self.builder_, self.visit_expr(found.x))
            else:
                y = _plain_bf16_conv(self.builder_, call, self.visit_expr(call.args[0]))
            if y is None:
                return super().visit_var_binding_(binding)
            self.set_var_remap(binding.var, y)

    return rewrite_relax_functions(mod, _Lower(mod))
