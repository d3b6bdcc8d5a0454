"""The AMX backend's plan: the x86 plan with AMX convs and dense kernels where the tiles pay.

Which int8 dense goes to the tiles is a measured rule: with fewer than
:data:`AMX_MIN_ROWS` rows (a batch-1 classifier) the weights' memory traffic
bounds AMX and VNNI alike (1x512x1000: 8.2 us AMX, 8.3 us VNNI), and VNNI
needs no tile configuration.
"""

from __future__ import annotations

from .. import base
from ..x86.plan import X86Plan, _VnniConv

#: fewest GEMM rows (M) for which an int8 dense goes to AMX rather than VNNI
AMX_MIN_ROWS = 16


def _rows(x_shape) -> int | None:
    try:
        rows = 1
        for d in list(x_shape)[:-1]:
            rows *= int(d)
        return rows
    except (TypeError, ValueError):
        return None


def _static(bb, x) -> list[int] | None:
    try:
        return [int(d) for d in bb.normalize(x).ty.shape.values]
    except (TypeError, AttributeError, ValueError):
        return None


class _AmxConv(base.ConvKernel):
    """The AMX int8 conv (:mod:`.conv_int8`) for a blocked layer it takes and where tiles pay; else VNNI.

    It needs the blocked uint8 input, one group, no dilation, and writes the
    requantized blocked output, so it runs between blocked layers; a narrow
    first layer on a plain ``NCHW`` input (an RGB stem, ``C * KW <= 64``)
    runs with its kernel columns folded into K (``emit_conv2d_amx_int8_taps``)
    where it pays (ResNet-18's 7x7 stem 1.62x VNNI; a 3x3 one stays on VNNI);
    a layer feeding a float op stays on VNNI, which converts layouts in its
    own passes.
    """

    requantizes = True

    def __init__(self, vnni: _VnniConv | None = None):
        self.vnni = vnni or _VnniConv()  # the x86 plan's choice: a 4-bit conv's packed kernel off the tiles

    def emit(self, bb, x, w_q, conv, requant, native_in, native_out):
        from . import conv_int8 as amx

        xs = _static(bb, x)
        if requant is None or xs is None:
            return self.vnni.emit(bb, x, w_q, conv, requant, native_in, native_out)
        args = (w_q.shape, conv.strides, conv.dilation, conv.groups)
        if (native_in and amx.amx_int8_conv_applicable(xs, *args)
                and amx.amx_int8_pays(amx.int8_geometry(xs, w_q.shape, conv.strides, conv.padding)) and native_out()):
            y = amx.emit_conv2d_amx_int8(bb, x, w_q, conv.strides, conv.padding, conv.pad_value, requant)
            return base.Emitted(y, base.NATIVE)
        if (not native_in and amx.amx_int8_taps_applicable(xs, *args) and amx.amx_int8_taps_pays(w_q.shape)
                and native_out()):  # an RGB stem with a window wide enough
            y = amx.emit_conv2d_amx_int8_taps(bb, x, w_q, conv.strides, conv.padding, conv.pad_value, requant)
            return base.Emitted(y, base.NATIVE)
        return self.vnni.emit(bb, x, w_q, conv, requant, native_in, native_out)


class AMXPlan(X86Plan):
    """The x86 plan with AMX int8 convs (blocked layers), int8 dense for large M, and bf16 dense."""

    def conv_kernel(self, node, choice, x_qparams, x_shape, w_shape):
        kernel = super().conv_kernel(node, choice, x_qparams, x_shape, w_shape)
        return _AmxConv(kernel) if isinstance(kernel, _VnniConv) else kernel

    def dense_kernel(self, choice, x_dtype, x_shape, w_shape):
        rows = _rows(x_shape)
        if x_dtype == "uint8" and rows is not None and rows >= AMX_MIN_ROWS:
            from .dense import emit_dense_amx

            return lambda bb, x, w_q: emit_dense_amx(bb, x, w_q, "int8")
        return super().dense_kernel(choice, x_dtype, x_shape, w_shape)

    def bf16_kernel(self, node, x_shape):
        """bf16 dense: the AMX kernel now; bf16 conv: None, the plain Relax op the build legalizes onto AMX
        (whose relu/relu6 the build fuses onto the tiles: ``bf16_epilogue``)."""
        if node.kind == "dense" and _rows(x_shape) is not None:
            from .dense import emit_dense_amx

            return lambda bb, x: emit_dense_amx(bb, x, node.weight, "bf16", bias=node.bias)
        return None


