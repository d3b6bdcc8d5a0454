"""Integer SiLU: applied in the write-back of the conv it reads, or on that conv's dequantized accumulator.

SiLU (``x * sigmoid(x)``, EfficientNet's and YOLO's activation) does not
commute with the affine map of a quantized tensor, so it cannot run on
8-bit codes the way a ReLU does, and a 256-entry table on the codes would
round its input to 8 bits first (where ``x < 0`` squeezes into a sliver of
the output range). hago instead reads the conv's int32 accumulator, as a
float op after the conv would: ``v = float32(acc + bias) * s_x s_w``,
``y = v * sigmoid(v)``, quantized to the SiLU's own output step. Annotate
leaves the SiLU's input edge float (:data:`hago.graph.ACCUMULATOR_READERS`)
and quantizes its output.

Where the conv's kernel requantizes in its own write-back (x86's VNNI and
depthwise kernels), it does all of that on its register tile
(:func:`.weighted.activation_requant`, :mod:`hago.backends.x86.epilogue`)
and writes the 8-bit SiLU output, blocked where the next layer reads it so:
one pass, a quarter of the bytes, where the float route costs a dequantize,
sigmoid, multiply and quantize pass over the int32 accumulator (half of
EfficientNet-B0's INT8 build). Elsewhere the same ops run as Relax ops on
the dequantized accumulator; both use :mod:`hago.fast_math`'s sigmoid.
"""

from __future__ import annotations

from tvm.relax import op as O

from .quant import quantize
from .registry import OpHandler


class SiLU(OpHandler):
    kinds = ("silu",)

    def realize(self, r, node, choice) -> None:
        if node.name in r.absorbed:  # the conv's write-back applied it and wrote this edge's value
            return
        f = r.bb.emit(O.nn.silu(r.get_float(node.inputs[0])))
        r.qval[node.name] = r.bb.emit(quantize(f, r.qparams(node.name)))
