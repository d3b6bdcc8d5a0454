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
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as O

from hago.graph import Node

BF16 = "bfloat16"


def round_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 ``a`` rounded to the nearest bfloat16 (ties to even), still as float32; NaN and inf kept."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(a), rounded, a).astype(np.float32)


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


def simulated_call(node: Node, call: relax.Call) -> relax.Call:
    """``node``'s float32 call with its input and weight rounded to bfloat16 (what the bf16 layer computes)."""
    x = O.astype(O.astype(call.args[0], BF16), "float32")
    return _op(node, x, relax.const(round_to_bf16(node.weight), "float32"))
