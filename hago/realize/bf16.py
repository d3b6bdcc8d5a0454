"""bf16 layers: conv2d / dense on bfloat16 input and weights, accumulated in float32.

A bf16 layer takes its float input and rounds it to bfloat16 (round to
nearest even, in the graph: the conversion fuses into whatever produced the
input), multiplies by weights rounded the same way at compile time, and
accumulates in float32. A product of two bfloat16 values is exact in float32,
so the layer differs from its simulated twin (:func:`simulated_call`: the same
op in float32 on the rounded values) only in summation order. The backend's
build turns the Relax op into its bf16 kernel (x86: ``vdpbf16ps``); any other
build legalizes it to float32 arithmetic on the rounded values, which is the
twin itself.

The twin rounds on the bits (:func:`_round_te`), never through a bf16
``astype`` pair: fused into one loop, TVM keeps that pair's value in fp32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from tvm import relax
from tvm.relax import op as O

from hago.graph import Node

BF16 = "bfloat16"


def round_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 ``a`` rounded to the nearest bfloat16 (ties to even), still as float32; NaN and inf kept."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _op(node: Node, x, w) -> relax.Call:
    """``node``'s conv2d / matmul on ``x`` and ``w`` with a float32 result."""
    if node.kind == "dense":
        return O.matmul(x, w, out_dtype="float32")
    a = node.call.attrs
    return O.nn.conv2d(x, w, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=int(a.groups),
                       data_layout="NCHW", kernel_layout="OIHW", out_dtype="float32")


def bf16_call(node: Node, x: relax.Expr) -> relax.Call:
    """The bf16 layer on float input ``x`` (bias not included): bfloat16 operands, float32 result."""
    w = O.astype(relax.const(round_to_bf16(node.weight), "float32"), BF16)  # folded to a bf16 constant
    return _op(node, O.astype(x, BF16), w)


def _round_te(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even) on its bits, kept float32.

    Not ``astype(astype(x, bf16), f32)``: once FuseTIR inlines the pair into
    one loop, TVM's bf16 legalization computes the bf16 value in fp32 and the
    rounding disappears (measured: the pair returns ``x`` unchanged in a
    fused kernel). A rounding on the bits survives any fusion.
    """
    from tvm import te, tirx

    def rne(*i):
        b = tirx.reinterpret("uint32", x(*i))
        lsb = (b >> tirx.const(16, "uint32")) & tirx.const(1, "uint32")
        r = (b + tirx.const(0x7FFF, "uint32") + lsb) & tirx.const(0xFFFF0000, "uint32")
        return tirx.reinterpret("float32", r)

    return te.compute(x.shape, rne, name="hago_round_bf16")


def simulated(bb: relax.BlockBuilder, node: Node, x: relax.Expr) -> relax.Expr:
    """``node``'s float32 op on float ``x`` and its weight, both rounded to bfloat16 (what the bf16 layer computes)."""
    xr = bb.emit_te(_round_te, x, primfunc_name_hint="hago_round_bf16")
    return _op(node, xr, relax.const(round_to_bf16(node.weight), "float32"))
