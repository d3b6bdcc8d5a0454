"""Weighted ops: conv2d / depthwise conv2d / dense as int8 arithmetic with int32 accumulation.

uint8|int8 activations times int8 weights. Asymmetric inputs are padded with
their zero point so ``(x - zp)`` is exactly 0 in the padding, and
``zp * sum(w)`` is folded with the bias into one int32 constant. The int32
accumulator is requantized (:meth:`Realizer.requant`) or, for a layer that
feeds only float ops, dequantized straight away (no rounding to 8 bits).

The backend's plan may put a hand-scheduled kernel in the plain op's place
(:meth:`hago.backends.Plan.conv_kernel` / ``dense_kernel``); a kernel that
requantizes in its own write-back gets the constants as a
:class:`~hago.backends.Requant`, with the clip of a relu/clip that alone
consumes the layer folded in.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from tvm import relax
from tvm.relax import op as O

from hago import sparq
from hago.backends import INT32, NATIVE, REQUANTIZED, ConvArgs, Requant
from hago.errors import QuantizeError
from hago.graph import accumulator_reader
from hago.qparams import container_dtype, fixed_point_multiplier

from . import multipoint
from .passthrough import activation_bounds
from .quant import const, fake_quantized_weight, quantize_layer_weight, shape
from .realizer import LayerConstants
from .registry import OpHandler


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


class Weighted(OpHandler):
    kinds = ("conv2d", "depthwise_conv2d", "dense")

    def takes_native(self, r, node, edge) -> bool:
        if r.s.sparq is not None:  # SPARQ trims the plain codes (vSPARQ pairs along the plain channel axis)
            return False
        return r.plan.takes_native(node, r.s.ops[node.name], edge)

    def simulated_call(self, node, call, strategy):
        """The op with its weight rounded to the strategy's bits (the scale floored as realize floors it)."""
        qx = strategy.resolved(node.inputs[0]).qparams
        sx = float(qx.scale) if qx is not None else None
        choice = strategy.ops[node.name]
        if choice.weight_scale is not None:  # trained integer weights on their own grid (hago.qat)
            w = relax.const(fake_quantized_weight(node, choice.weight_bits, sx, choice.weight_scale), "float32")
        else:
            w = relax.const(multipoint.simulated_weight(node, choice, sx), "float32")
        return relax.Call(call.op, [call.args[0], w], call.attrs, call.ty_args)

    def realize(self, r, node, choice) -> None:
        conv = node.kind != "dense"
        src = node.inputs[0]
        native_in = conv and src in r.native and r.takes_native(node.name, src)
        if conv and not native_in and r.takes_native(node.name, src):
            native_in = r.native_from_float(src)  # a blocked float producer: quantized in its layout
        xq, qx = (r.native[src], r.qparams(src)) if native_in else r.get_quant(src)
        if not native_in:
            xq = sparq.realized_input(r.bb, node, r.s, xq, qx)  # the spec's SPARQ trimming, if any
        xs = r.edge_shape(src) if native_in else shape(xq)
        sx, zx = float(qx.scale), int(qx.zero_point)
        wq, wqp = quantize_layer_weight(node, choice.weight_bits, sx, choice.weight_scale)
        points = multipoint.layer_points(node, choice)  # extra output channels (hago.multipoint), or None
        wk = multipoint.widened(node, wq, points) if points is not None else wq  # what the kernel multiplies by
        acc_scale = sx * wqp.scale.astype(np.float64)
        bias = node.bias if node.bias is not None else np.zeros_like(acc_scale)
        bias_q = np.round(bias.astype(np.float64) / acc_scale)
        wsum = wk.astype(np.int64).reshape(wk.shape[0], -1).sum(axis=1) if conv else wk.astype(np.int64).sum(axis=0)
        # sum((x - zx) * w) = sum(x * w) - zx * sum(w): fold the zero-point term into the bias (an extra
        # channel gets its own zero-point term and no bias)
        folded = np.concatenate([bias_q, np.zeros(len(wsum) - len(bias_q))]) - zx * wsum
        if np.abs(folded).max(initial=0) >= 2**31:
            raise QuantizeError(f"{node.name}: int32 bias overflows; the input scale is too small")
        consts = LayerConstants(wq, wqp.scale, bias_q.astype(np.int32))
        r.layers[node.name] = consts
        out = r.s.edges[node.name]
        qy = r.qparams(node.name) if out.bits else None
        real = acc_scale / float(qy.scale) if out.bits else None
        if out.bits and r.style != "float":
            consts.multiplier, consts.shift = fixed_point_multiplier(real, r.style)
        if conv:
            # a multipoint conv's kernel stops at the int32 accumulator: the weighted sum comes before requantize
            reader = accumulator_reader(r.g, r.s, node.name) if points is None and not out.bits else None
            acc = self.conv(r, node, choice, xq, qx, xs, wk, folded, consts, qy, native_in, epilogue=points is None,
                            reader=reader)
            if acc is None:  # the kernel wrote the integer output itself
                return
            bshape = (1, -1, 1, 1)
        else:
            kernel = r.plan.dense_kernel(choice, container_dtype(qx.dtype), xs, wk.shape)
            acc = kernel(r.bb, xq, wk) if kernel is not None else O.matmul(xq, const(wk, "int8"), out_dtype="int32")
            bshape = (-1,)
        if not isinstance(acc, relax.Var):  # (re-binding a kernel's output var would block its fusion)
            acc = r.bb.emit(acc)
        acc = r.bb.emit(O.add(acc, const(folded.astype(np.int32).reshape(bshape), "int32")))
        if points is not None:  # the fused weighted sum: each extra channel into its source channel
            acc = multipoint.emit_weighted_sum(r.bb, acc, node, points, wqp.scale, len(bias_q))
        if out.bits:
            r.qval[node.name] = r.bb.emit(r.requant(acc, real, qy, bshape))
        else:
            f = O.multiply(O.astype(acc, "float32"), const(acc_scale.reshape(bshape), "float32"))
            r.fval[node.name] = r.bb.emit(f)

    def conv(self, r, node, choice, xq, qx, xs, wq, folded, consts, qy, native_in, epilogue: bool = True,
             reader=None):
        """The conv's int32 accumulator, or None when a kernel wrote the integer output (plain or native).

        ``epilogue=False`` (a multipoint layer, whose weighted sum comes first): the plain NCHW int32
        accumulator whatever the output, no requantizing write-back, no blocked hand-over to float readers.
        ``reader``: the integer SiLU that alone reads the conv (:func:`hago.graph.accumulator_reader`); a
        requantizing kernel applies it in its write-back and writes the SiLU's output (:mod:`.silu`).
        """
        a = node.call.attrs
        pad = [int(p) for p in a.padding]  # (top, left, bottom, right)
        groups = int(a.groups)
        kernel = r.plan.conv_kernel(node, choice, qx, xs, wq.shape)
        rq = None  # a kernel requantizes in its own write-back when the output is integer
        written = node.name  # the edge whose integer value the kernel writes
        if epilogue and reader is not None and kernel is not None and kernel.requantizes:
            rq = activation_requant(r, reader, folded, float(qx.scale) * consts.weight_scale.astype(np.float64))
            written = reader.name
        elif epilogue and qy is not None and kernel is not None and kernel.requantizes and (
                consts.multiplier is not None or r.style == "float"):
            scale = None
            if r.style == "float":  # what realize's float requantize multiplies by, rounded to float32 as there
                real = float(qx.scale) * consts.weight_scale.astype(np.float64) / float(qy.scale)
                scale = real.astype(np.float32)
            rq = Requant(folded.astype(np.int32), consts.multiplier, consts.shift, int(qy.zero_point),
                         int(qy.qmin), int(qy.qmax), container_dtype(qy.dtype), scale=scale)
            rq = absorb_activation(r, node.name, rq)
        if kernel is not None:
            float_out = r.plan.float_layout_consumed(node.name) if epilogue and qy is None and rq is None else None
            args = ConvArgs(_ints(a.strides), pad, _ints(a.dilation), groups, int(qx.zero_point), float_out)
            emitted = kernel.emit(r.bb, xq, wq, args, rq, native_in, lambda: r.native_output(written))
            if written != node.name:
                r.absorbed.add(written)
            if emitted.form == NATIVE:
                r.native[written] = emitted.value
                return None
            if emitted.form == REQUANTIZED:
                r.qval[written] = emitted.value
                return None
            assert written == node.name, emitted.form
            assert emitted.form == INT32, emitted.form
            return emitted.value
        if any(pad):
            top, left, bottom, right = pad
            xq = r.bb.emit(O.nn.pad(xq, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(qx.zero_point)))
        return O.nn.conv2d(xq, const(wq, "int8"), strides=a.strides, padding=0, dilation=a.dilation,
                           groups=groups, out_dtype="int32")


def activation_requant(r, reader, folded: np.ndarray, acc_scale: np.ndarray) -> Requant:
    """The write-back of a conv that applies ``reader`` (a SiLU): dequantize, the activation, quantize.

    ``acc_scale`` (``s_x * s_w`` per channel) is rounded to float32 as realize's own dequantize rounds it,
    so the kernel computes what the plain ops would (:mod:`.silu`).
    """
    qa = r.qparams(reader.name)
    return Requant(folded.astype(np.int32), None, None, int(qa.zero_point), int(qa.qmin), int(qa.qmax),
                   container_dtype(qa.dtype), scale=np.asarray(acc_scale).astype(np.float32),
                   activation=reader.kind, out_scale=float(qa.scale))


def absorb_activation(r, name: str, rq: Requant) -> Requant:
    """``rq`` with the clip of the relu/clip that alone consumes ``name`` folded in (see ``Realizer.absorbed``).

    A kernel that requantizes in its own loop nest is opaque to FuseOps, so
    a relu6 after it would be one more pass over the tensor; clipping in
    the requantize is the same arithmetic. Only where the activation's
    output keeps the conv's scale and zero point (it always should).
    """
    act = r.sole_activation(name, "integer")
    if act is None or not r.s.resolved(act.name).bits:
        return rq
    qp, qa = r.qparams(name), r.qparams(act.name)
    if (float(qp.scale), int(qp.zero_point), qp.dtype) != (float(qa.scale), int(qa.zero_point), qa.dtype):
        return rq
    lo, hi = activation_bounds(act, qp)
    r.absorbed.add(act.name)
    return replace(rq, qmin=max(rq.qmin, lo), qmax=min(rq.qmax, hi))

