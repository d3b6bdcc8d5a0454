"""Integer channel scale: ``x * g`` with ``x`` an 8-bit tensor and ``g`` a float ``[N, C, 1, 1]`` gate.

A squeeze-excitation scales each channel of a block's widest tensor by a
gate computed from it (``sigmoid`` of two tiny convs). The tensor arrives
8-bit (the depthwise conv's SiLU output, :mod:`.silu`) and leaves 8-bit
(the project conv reads it), so the scale runs on the codes:
``quantize(dequantize(x) * g)`` in one fused pass, in the blocked layout
where ``x`` is blocked (the gate moved into it, its padded channels 0, so
padded channels stay at the output zero point). In float, the same
multiply read a float32 copy of ``x`` in NCHW and wrote another.
"""

from __future__ import annotations

from tvm.relax import op as O

from hago.graph import channel_scale_operands, quantized_inputs

from .quant import dequantize, quantize
from .registry import OpHandler


class ChannelScale(OpHandler):
    kinds = ("multiply",)

    def takes_native(self, r, node, edge) -> bool:
        return edge in quantized_inputs(r.g, node)

    def realize(self, r, node, choice) -> None:
        (data,) = quantized_inputs(r.g, node)
        gate = r.subst(node.call.args[channel_scale_operands(node.call)[1]])
        qx, qy = r.qparams(data), r.qparams(node.name)
        blocked_gate = r.plan.layout.float_to_native(r.bb, gate) if data in r.native else None
        native = blocked_gate is not None
        x = r.native[data] if native else r.get_quant(data)[0]
        y = quantize(O.multiply(dequantize(x, qx), blocked_gate if native else gate), qy)
        (r.native if native else r.qval)[node.name] = r.bb.emit(y)
