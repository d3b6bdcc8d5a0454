"""EfficientNet's inverted residual in integer: SiLU in the conv's write-back, the squeeze-excitation on the codes.

``torch.onnx.export`` writes SiLU as ``x * sigmoid(x)``; prepare makes it one
``nn.silu`` (:func:`hago.prepare.fuse_silu`). On x86 the VNNI and depthwise
kernels apply it on their register tiles and write its 8-bit output, blocked
(:mod:`hago.realize.silu`); the squeeze-excitation's pool and its gate's
multiply run on those codes in the same layout (:mod:`hago.realize.pool`,
:mod:`hago.realize.scale`). The reference is the plain route: the same
strategy realized with the SiLUs as Relax ops on the dequantized accumulators
(the write-back disabled). Both must give the same numbers, the blocked route
with no SiLU pass over a feature map and no NCHW round trip inside the block.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn

import tvm
from tvm import relax

import hago.realize.weighted as weighted
from hago import build as hago_build
from hago.compiler import quantize
from hago.hwspec import HardwareSpec
from hago.pipeline import lower, prepare_model
from irstats import fused_calls

pytestmark = pytest.mark.llvm

SPEC = HardwareSpec.load("x86-avx512-vnni")
SIZE = 12


class MBConv(nn.Module):
    """1x1 expand + SiLU, 3x3 depthwise + SiLU, squeeze-excitation (SiLU, sigmoid gate), 1x1 project, a 1x1 conv."""

    def __init__(self, c: int = 16, wide: int = 32):
        super().__init__()
        self.expand, self.dw = nn.Conv2d(c, wide, 1), nn.Conv2d(wide, wide, 3, padding=1, groups=wide)
        self.se1, self.se2 = nn.Conv2d(wide, 8, 1), nn.Conv2d(8, wide, 1)
        self.project, self.head = nn.Conv2d(wide, c, 1), nn.Conv2d(c, 16, 1)

    def forward(self, x):
        f = nn.functional
        y = f.silu(self.dw(f.silu(self.expand(x))))
        y = y * torch.sigmoid(self.se2(f.silu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.head(self.project(y))


@pytest.fixture(scope="module")
def routes():
    """``{"write-back"|"plain": (calls, outputs)}`` for one calibrated strategy, plus the strategy."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 16, SIZE, SIZE)).astype("float32")
    x = rng.standard_normal((3, 16, SIZE, SIZE)).astype("float32")
    prep = prepare_model(MBConv().eval(), calib, example_inputs=(torch.zeros(1, 16, SIZE, SIZE),))
    q = quantize(prep, SPEC)
    out = {}
    for route in ("write-back", "plain"):
        with pytest.MonkeyPatch.context() as mp:
            if route == "plain":
                mp.setattr(weighted, "accumulator_reader", lambda graph, strategy, name: None)
            _, realized = lower(prep, q.strategy, SPEC, batch=1)
            calls = fused_calls(realized.mod, SPEC)
            vm = relax.VirtualMachine(hago_build.build_for(realized.mod, SPEC), tvm.cpu())
        ys = np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1])).numpy() for i in range(len(x))])
        out[route] = (calls, ys)
    return prep, q.strategy, out


def test_silu_pool_and_gate_are_integer(routes):
    prep, strategy, _ = routes
    kinds = collections.Counter(n.kind for n in prep.graph.nodes)
    assert kinds["silu"] == 3 and kinds["global_avg_pool2d"] == 1 and kinds["multiply"] == 1, kinds
    modes = {(n.kind, strategy.ops[n.name].mode) for n in prep.graph.nodes
             if n.kind in ("silu", "global_avg_pool2d", "multiply", "conv2d", "depthwise_conv2d")}
    assert {m for _, m in modes} == {"integer"}, modes
    # a SiLU reads its conv's accumulator: that edge is never quantized; its own output is
    for n in prep.graph.nodes:
        if n.kind == "silu":
            assert not strategy.edges[n.inputs[0]].bits and strategy.edges[n.name].bits == 8


def test_write_back_matches_the_plain_route_in_one_blocked_pass(routes):
    _, _, out = routes
    (wb_calls, wb_y), (plain_calls, plain_y) = out["write-back"], out["plain"]
    # the plain route: a SiLU pass per activation, on the int32 accumulator in NCHW; the write-back route none
    assert sum(v for k, v in plain_calls.items() if "silu" in k) == 3, plain_calls
    assert not any("silu" in k for k in wb_calls), wb_calls
    # blocked from the input's conversion on: the pool, the gate's multiply and the project conv read the
    # depthwise conv's codes as it wrote them (back to NCHW only where float begins: the gate, the output)
    assert wb_calls["hago_nchw_to_nchwc"] == 1 and plain_calls["hago_nchw_to_nchwc"] == 4, (wb_calls, plain_calls)
    assert wb_calls["hago_conv2d_depthwise_nchwc"] == 1 and wb_calls["fused_dequantize_multiply2_quantize"] == 1
    assert sum(wb_calls.values()) <= sum(plain_calls.values()) - 6, (wb_calls, plain_calls)
    np.testing.assert_array_equal(wb_y, plain_y)
    assert np.abs(wb_y).max() > 0.1  # a real signal went through the block
