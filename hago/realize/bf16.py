"""bf16 layers: conv2d / dense on bfloat16 input and weights, accumulated in float32.

A bf16 layer takes its float input and rounds it to bfloat16 (round to
nearest even, in the graph: the conversion fuses into whatever produced the
input), multiplies by weights rounded the same way at compile time, and
accumulates in float32. A depthwise conv in bf16 is bf16 storage of its
input only, its weights fp32 (:func:`stores_only`). A product of two bfloat16 values is exact in float32,
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


def stores_only(node: Node) -> bool:
    """Whether ``node``'s bf16 form is bf16 storage alone: a depthwise conv, whose kernel (every CPU backend's
    ``cpu.float_kernels.depthwise_nchwc``) widens its bf16 input to fp32 and multiply-adds in fp32, since one
    channel per group has no bf16 pairs to feed a dot-product instruction. Its weights stay fp32: they are a few
    values per channel whose rounding errors do not average out over a long sum (EfficientNet-Lite0, all bf16,
    mean KL against FP32 on its photo views: 0.0027 with them rounded to bf16, 0.0009 without)."""
    return node.kind == "depthwise_conv2d"


def bf16_weight(node: Node) -> np.ndarray:
    """The weight ``node``'s bf16 layer multiplies by: rounded to bf16 (nearest even), fp32 where
    :func:`stores_only`."""
    return np.asarray(node.weight, np.float32) if stores_only(node) else round_to_bf16(node.weight)


def bf16_call(node: Node, x: relax.Expr) -> relax.Call:
    """The bf16 layer on float input ``x`` (bias not included): bfloat16 input, bfloat16 weights (fp32 where
    :func:`stores_only`), float32 result."""
    w = relax.const(bf16_weight(node), "float32")
    if not stores_only(node):
        w = O.astype(w, BF16)  # folded to a bf16 constant
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
    return _op(node, xr, relax.const(bf16_weight(node), "float32"))
