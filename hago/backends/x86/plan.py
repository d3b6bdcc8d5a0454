"""The x86 plan: which integer layer runs on a hand-scheduled kernel, and where activations stay blocked.

Realize asks it per layer (:class:`hago.backends.Plan`). Where the spec's
descriptor names them, hago's hand-scheduled kernels (:mod:`.kernels`) stand
in for the plain ops: VNNI conv/dense (``weight_layout: OIHW4i16o4i`` /
``NK16n4k``, uint8 activations), and the depthwise kernel (the depthwise
descriptor ``layout: NCHW`` with ``inputs: [uint8, int8]``), which pads and
requantizes inside its own loop nest.

On VNNI specs, integer activations between VNNI convs stay in the blocked
NCHW16c layout (:mod:`.vnni`: channels padded to 16 with the zero point): the
conv requantizes on its register tiles, and residual adds, relu/clip,
max-pool and depthwise convs (:mod:`.depthwise_blocked`) run on the blocked
tensor. The layout changes back to NCHW only where an op needs it (a float
op, a reshape).
"""

from __future__ import annotations

import tvm

from hago.errors import QuantizeError
from hago.qparams import QParams, container_dtype

from .. import base
from . import VNNI_WEIGHT_LAYOUTS, kernels
from .vnni import BLOCKED


def _shape(var) -> list:
    return [int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else d for d in var.ty.shape]


class Blocked(base.NativeLayout):
    """uint8 NCHW16c, channels padded to 16 with the zero point (:func:`.vnni.emit_to_blocked`)."""

    name = BLOCKED
    plain = "NCHW"

    def to_native(self, bb, q, zero_point: int):
        return kernels.emit_to_blocked(bb, q, int(zero_point))

    def to_plain(self, bb, value, channels: int):
        return kernels.emit_from_blocked(bb, value, channels)


def packed_layout(choice, qx: QParams) -> bool:
    """Whether the spec's descriptor asks for VNNI-packed weights (u8 x s8 blocked layouts)."""
    layout = (choice.descriptor or {}).get("weight_layout")
    return layout in VNNI_WEIGHT_LAYOUTS and container_dtype(qx.dtype) == "uint8"


def depthwise_kernel(choice, qx: QParams) -> bool:
    """Whether to run hago's NCHW u8 x s8 depthwise kernel (x86 specs' depthwise descriptor).

    The descriptor names no packed layout (``layout: NCHW``); uint8 x int8
    NCHW is what the kernel takes. ``schedule_vnni`` schedules it on any
    LLVM CPU target.
    """
    d = choice.descriptor or {}
    return (choice.kind == "depthwise_conv2d" and d.get("layout", "NCHW") == "NCHW"
            and list(d.get("inputs", [])) == ["uint8", "int8"] and container_dtype(qx.dtype) == "uint8")


class _Depthwise(base.ConvKernel):
    """:func:`.depthwise.emit_conv2d_depthwise`, or the blocked one on an NCHW16c input."""

    requantizes = True

    def emit(self, bb, x, w_q, conv, requant, native_in, native_out):
        pad, zx = conv.padding, conv.pad_value
        if native_in and requant is not None:  # NCHW16c in and out, pads itself
            y = kernels.emit_conv2d_depthwise_blocked(bb, x, w_q, requant, conv.strides, pad, conv.dilation,
                                                      pad_value=zx)
            return base.Emitted(y, base.NATIVE)
        # pads itself (wider, for whole vectors)
        acc = kernels.emit_conv2d_depthwise(bb, x, w_q, conv.strides, pad, conv.dilation, pad_value=zx,
                                            groups=conv.groups, requant=requant)
        return base.Emitted(acc, base.REQUANTIZED if requant is not None else base.INT32)


class _VnniConv(base.ConvKernel):
    """:func:`.vnni.emit_conv2d_vnni`; the NCHW -> NCHW16c conversion pads: no padded NCHW copy."""

    requantizes = True

    def emit(self, bb, x, w_q, conv, requant, native_in, native_out):
        blocked = requant is not None and conv.groups == 1 and native_out()
        layout = BLOCKED if blocked else "NCHW"
        acc = kernels.emit_conv2d_vnni(bb, x, w_q, conv.strides, conv.dilation, conv.groups, padding=conv.padding,
                                       pad_value=conv.pad_value, requant=requant, out_layout=layout)
        if blocked:
            return base.Emitted(acc, base.NATIVE)
        return base.Emitted(acc, base.REQUANTIZED if requant is not None else base.INT32)


class X86Plan(base.Plan):
    """VNNI and depthwise kernels where the descriptors ask for them, NCHW16c between VNNI layers."""

    layout = Blocked()

    def qparams(self, edge: str) -> QParams:
        qp = self.strategy.resolved(edge).qparams
        if qp is None:
            raise QuantizeError(f"edge {edge!r} has no calibrated parameters; calibrate before realize")
        return qp

    def channels(self, edge: str) -> int:
        return int(_shape(self.graph.edge_var[edge])[1])

    def holds_native(self, edge: str) -> bool:
        """Whether ``edge`` may be held blocked: a static 4-D uint8 integer tensor."""
        shape = _shape(self.graph.edge_var[edge]) if edge in self.graph.edge_var else []
        res = self.strategy.resolved(edge)
        return (len(shape) == 4 and all(isinstance(d, int) for d in shape) and bool(res.bits)
                and res.qparams is not None and container_dtype(res.qparams.dtype) == "uint8")

    def takes_native(self, node, choice, edge: str) -> bool:
        """Whether integer conv ``node`` runs on ``edge`` blocked: a VNNI conv, or the depthwise kernel.

        The blocked depthwise kernel writes 8 bits: an integer output only.
        """
        if node.kind == "depthwise_conv2d":
            return (bool(self.strategy.edges[node.name].bits) and depthwise_kernel(choice, self.qparams(edge))
                    and node.weight.shape[0] == self.channels(edge))
        if node.kind == "conv2d" and node.inputs[0] == edge:
            xs = _shape(self.graph.edge_var[edge])
            return (int(node.call.attrs.groups) == 1 and packed_layout(choice, self.qparams(edge))
                    and kernels.vnni_applicable("conv2d", xs, node.weight.shape, 1))
        return False

    def conv_kernel(self, node, choice, x_qparams, x_shape, w_shape):
        groups = int(node.call.attrs.groups)
        if depthwise_kernel(choice, x_qparams) and kernels.depthwise_applicable(x_shape, w_shape, groups):
            return _Depthwise()
        if packed_layout(choice, x_qparams) and kernels.vnni_applicable("conv2d", x_shape, w_shape, groups):
            return _VnniConv()
        return None

    def bf16_kernel(self, node, x_shape):
        """The ``vdpbf16ps`` kernels (:mod:`.bf16`): NCHW fp32 in and out, conversions inside."""
        from . import bf16

        a = node.call.attrs
        groups = 1 if node.kind == "dense" else int(a.groups)
        if not bf16.bf16_applicable("dense" if node.kind == "dense" else "conv2d", x_shape, node.weight.shape,
                                    groups):
            return None
        if node.kind == "dense":
            return lambda bb, x: bf16.emit_dense_bf16(bb, x, node.weight, bias=node.bias)
        pad = tuple(int(p) for p in a.padding)
        return lambda bb, x: bf16.emit_conv2d_bf16(bb, x, node.weight, tuple(int(s) for s in a.strides),
                                                   tuple(int(d) for d in a.dilation), groups, pad, bias=node.bias)

    def dense_kernel(self, choice, x_dtype, x_shape, w_shape):
        layout = (choice.descriptor or {}).get("weight_layout")
        if layout in VNNI_WEIGHT_LAYOUTS and x_dtype == "uint8" and kernels.vnni_applicable("dense", x_shape, w_shape):
            return kernels.emit_dense_vnni
        return None
