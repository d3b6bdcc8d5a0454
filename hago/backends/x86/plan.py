"""The x86 plan: which integer layer runs on a hand-scheduled kernel, and where activations stay blocked.

Realize asks it per layer (:class:`hago.backends.Plan`). Where the spec's
descriptor names them, hago's hand-scheduled kernels (:mod:`.kernels`) stand
in for the plain ops: VNNI conv/dense (``weight_layout: OIHW4i16o4i`` /
``NK16n4k``, uint8 activations; a 4-bit dense or conv with packed weights,
:mod:`.vnni_int4`, :mod:`.vnni_conv_int4`), and the depthwise kernel (the depthwise
descriptor ``layout: NCHW`` with ``inputs: [uint8, int8]``), which pads and
requantizes inside its own loop nest.

On VNNI specs, integer activations between VNNI convs stay in the blocked
NCHW16c layout (:mod:`.vnni`: channels padded to 16 with the zero point): the
conv requantizes on its register tiles, and residual adds, relu/clip,
max-pool and depthwise convs (:mod:`.depthwise_blocked`) run on the blocked
tensor. The layout changes back to NCHW only where an op needs it (a float
op, a reshape).

A float layer between integer ones keeps their blocks where the build runs it
in NCHW16c too (a float conv whose channels divide by 16: ConvertLayout's
choice on these AVX-512 CPUs): the int8 conv before it returns its int32
accumulator through a Relax layout transform and the one after it quantizes
the float tensor after one (:meth:`X86Plan.float_layout_consumed` /
``float_layout_produced`` decide where); the build's
:mod:`..cpu.layout_pairs` drops each against ConvertLayout's inverse, so
bias, dequantize, activation and quantize run on the blocked tensors.
"""

from __future__ import annotations

import tvm
from tvm.relax import op as O

from hago.errors import QuantizeError
from hago.graph import accumulator_reader
from hago.qparams import QParams, container_dtype

from .. import base
from ..cpu.layout_pairs import ELEMENTWISE
from . import VNNI_WEIGHT_LAYOUTS, kernels
from .vnni import BLOCKED, LANES

#: float ops a blocked float layout passes through unchanged (ConvertLayout carries it; kinds of hago.graph)
_FLOAT_CARRIERS = ("relu", "clip", "max_pool2d", "avg_pool2d", "global_avg_pool2d", "add")
_FLOAT_CONVS = ("conv2d", "depthwise_conv2d")


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

    def float_to_native(self, bb, value):
        """A Relax ``layout_transform`` NCHW -> NCHW16c (cancelled against a blocked float producer's); None
        where the channels are not a multiple of 16 (the blocked float layers would then use smaller blocks)."""
        shape = _shape(bb.normalize(value))
        if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] % LANES:
            return None
        return bb.emit(O.layout_transform(value, lambda n, c, h, w: (n, c // LANES, h, w, c % LANES)))


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
        if native_in and conv.float_out_layout == BLOCKED:  # int32 NCHW16c for a blocked float reader: the
            # way back to NCHW is a Relax transform the build cancels against the reader's
            acc = kernels.emit_conv2d_depthwise_blocked(bb, x, w_q, None, conv.strides, pad, conv.dilation,
                                                        pad_value=zx)
            return base.Emitted(bb.emit(O.layout_transform(acc, lambda n, c, h, w, lane: (n, c * LANES + lane, h, w))),
                                base.INT32)
        # pads itself (wider, for whole vectors)
        acc = kernels.emit_conv2d_depthwise(bb, x, w_q, conv.strides, pad, conv.dilation, pad_value=zx,
                                            groups=conv.groups, requant=requant)
        return base.Emitted(acc, base.REQUANTIZED if requant is not None else base.INT32)


class _VnniConv(base.ConvKernel):
    """:func:`.vnni.emit_conv2d_vnni`; the NCHW -> NCHW16c conversion pads: no padded NCHW copy."""

    requantizes = True
    #: the conv emitter's name in :mod:`.kernels` (looked up per call)
    emitter = "emit_conv2d_vnni"

    def emit(self, bb, x, w_q, conv, requant, native_in, native_out):
        blocked = requant is not None and conv.groups == 1 and native_out()
        layout = BLOCKED if blocked else "NCHW"
        # a float output read blocked again: the int32 accumulator's way back to NCHW is one the build cancels
        relax_back = requant is None and conv.float_out_layout == BLOCKED
        emit = getattr(kernels, self.emitter)
        acc = emit(bb, x, w_q, conv.strides, conv.dilation, conv.groups, padding=conv.padding,
                   pad_value=conv.pad_value, requant=requant, out_layout=layout, relax_back=relax_back)
        if blocked:
            return base.Emitted(acc, base.NATIVE)
        return base.Emitted(acc, base.REQUANTIZED if requant is not None else base.INT32)


class _VnniConvInt4(_VnniConv):
    """:func:`.vnni_conv_int4.emit_conv2d_vnni_int4`: the same conv, its 4-bit weights packed two per byte."""

    emitter = "emit_conv2d_vnni_int4"


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

        The blocked depthwise kernel writes 8 bits (its own, or a SiLU's that it applies in the write-back),
        or its int32 accumulator for float readers that read it blocked (a bf16 or float conv the build blocks).
        """
        if node.kind == "depthwise_conv2d":
            out = (bool(self.strategy.edges[node.name].bits) or self.float_layout_consumed(node.name) == BLOCKED
                   or accumulator_reader(self.graph, self.strategy, node.name) is not None)
            return (out and depthwise_kernel(choice, self.qparams(edge))
                    and node.weight.shape[0] == self.channels(edge))
        if node.kind == "conv2d" and node.inputs[0] == edge:
            xs = _shape(self.graph.edge_var[edge])
            return (int(node.call.attrs.groups) == 1 and packed_layout(choice, self.qparams(edge))
                    and kernels.vnni_applicable("conv2d", xs, node.weight.shape, 1))
        return False

    # ---- float (and bf16) layers between blocked integer ones ---------------------------------------
    # The CPU build blocks float convs with ConvertLayout (:mod:`..cpu.float_layout`): on the AVX-512 CPUs
    # VNNI needs, 16 float lanes, so a float conv whose channels divide by 16 runs in NCHW16c, the layout
    # of the integer activations. An int8 conv next to such a layer converts through Relax layout
    # transforms that :mod:`..cpu.layout_pairs` cancels against ConvertLayout's: no NCHW pass between them.
    # bf16 convs are blocked the same way (the x86 and AMX backends lower them after ConvertLayout).
    def _float_conv_blocked(self, node, port: int) -> bool:
        """Whether float conv ``node``'s data (``port`` 0) or output (2) layout will be NCHW16c."""
        from ..cpu.float_layout import conv_layouts

        layouts = conv_layouts(node.call, LANES)
        return layouts is not None and layouts[port] == BLOCKED

    def _float(self, name: str) -> bool:
        """Whether op ``name`` runs in float or bf16: the build blocks a bf16 conv as it does a float one (a
        plain Relax conv on bf16 operands, ConvertLayout's choice of layout), so both meet int8 layers blocked."""
        return self.strategy.ops[name].mode in ("float", "bf16")

    def _produced_blocked(self, edge: str) -> bool:
        node = self.graph.producer(edge)
        if node is None or not self._float(node.name):
            return False
        if node.kind in _FLOAT_CONVS:
            return self._float_conv_blocked(node, 2)
        if node.kind in _FLOAT_CARRIERS or (node.kind == "other" and node.relax_op in ELEMENTWISE):
            return any(self._produced_blocked(e) for e in node.inputs)
        return False

    def float_layout_produced(self, edge: str) -> str | None:
        """NCHW16c where a float conv the build blocks produces ``edge`` through ops that keep its layout."""
        return BLOCKED if self._produced_blocked(edge) else None

    def _consumed_blocked(self, edge: str) -> bool:
        """Whether every reader of float ``edge`` reads it blocked (at most one through element-wise ops)."""
        readers = self.graph.consumers.get(edge, [])
        if not readers or edge in self.graph.outputs:
            return False  # the network's output is plain
        elementwise = 0
        for name in readers:
            node = self.graph.node(name)
            if not self._float(name):
                return False
            if node.kind in _FLOAT_CONVS and node.inputs[0] == edge and self._float_conv_blocked(node, 0):
                continue
            if node.kind == "add" and any(self._produced_blocked(e) for e in node.inputs if e != edge):
                continue  # ConvertLayout blocks the add and converts this operand to it
            if node.kind in ("relu", "clip") or (node.kind == "other" and node.relax_op in ELEMENTWISE
                                                 and node.inputs == [edge]):
                elementwise += 1  # moved onto the blocked tensor, with the ops before it
                if elementwise == 1 and self._consumed_blocked(name):
                    continue
            return False
        return True

    def float_layout_consumed(self, edge: str) -> str | None:
        """NCHW16c where every reader of ``edge`` reads it blocked: blocked float convs, adds with a blocked
        operand, or one chain of element-wise ops leading to them (moved onto the blocked tensor when the
        layout round trip is cancelled). A plain reader anywhere keeps the NCHW route."""
        return BLOCKED if self._consumed_blocked(edge) else None

    def conv_kernel(self, node, choice, x_qparams, x_shape, w_shape):
        """Depthwise: the depthwise kernel, int8 weights at any bit width (a broadcast weight per tap and
        channel, no ``vpdpbusd`` block to feed nibbles). VNNI: a 4-bit conv stores its weights packed
        (:mod:`.vnni_conv_int4`) where its 16 x accumulator fits int32 and packing saves bytes, else the int8
        kernel runs its 4-bit values (at most 4 input channels, an RGB stem: padded to 8 for the nibble pairs,
        the packed weight takes the int8 one's bytes, padded to 4, for twice the multiply-adds)."""
        groups = int(node.call.attrs.groups)
        if depthwise_kernel(choice, x_qparams) and kernels.depthwise_applicable(x_shape, w_shape, groups):
            return _Depthwise()
        if packed_layout(choice, x_qparams) and kernels.vnni_applicable("conv2d", x_shape, w_shape, groups):
            if (choice.weight_bits == 4 and int(w_shape[1]) > 4
                    and kernels.conv_int4_applicable(x_shape, w_shape, groups)):
                return _VnniConvInt4()
            return _VnniConv()
        return None

    def bf16_kernel(self, node, x_shape):
        """bf16 dense: the ``vdpbf16ps`` kernel (:mod:`.bf16`), fp32 in and out, conversions inside. bf16 conv:
        None, the plain Relax op, which the build blocks with its float neighbours and puts on the same kernel
        with its bias, activation and bf16 cast in the write-back (:mod:`.bf16_blocked`)."""
        from . import bf16

        if node.kind != "dense":
            return None
        if not bf16.bf16_applicable("dense", x_shape, node.weight.shape):
            return None
        return lambda bb, x: bf16.emit_dense_bf16(bb, x, node.weight, bias=node.bias)

    def row_quantize_kernel(self, x_shape):
        from ..cpu.row_quantize import emit_row_quantize

        if any(not isinstance(d, int) for d in x_shape):  # a symbolic batch: the plain ops handle any shape
            return None
        return lambda bb, x: emit_row_quantize(bb, x, LANES)

    def dense_kernel(self, choice, x_dtype, x_shape, w_shape):
        """VNNI on uint8 activations; a 4-bit dense (the spec lists 4 in ``bits.weight``, so annotate could
        give it) stores its weights packed, two per byte (:mod:`.vnni_int4`)."""
        layout = (choice.descriptor or {}).get("weight_layout")
        if layout in VNNI_WEIGHT_LAYOUTS and x_dtype == "uint8" and kernels.vnni_applicable("dense", x_shape, w_shape):
            if choice.weight_bits == 4 and kernels.int4_applicable(x_shape, w_shape):
                return kernels.emit_dense_vnni_int4
            return kernels.emit_dense_vnni
        return None
