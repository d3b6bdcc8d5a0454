"""AdaRound (hago.correct.adaround) on real numbers.

A small MobileNet-style block with 4-bit weights: learning each depthwise
weight's rounding must lower the realized integer program's error against
FP32 on images it was not fitted on, move weights by at most one grid step,
reach the integer weights realize bakes, and replay bit for bit from the
strategy JSON.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hago.compiler import quantize
from hago.correct import CORRECTIONS, corrected_graph, rounding
from hago.errors import QuantizeError
from hago.frontend import load_model
from hago.qparams import quantize_weight, weight_qparams
from hago.strategy import Strategy

from . import blocks

pytestmark = pytest.mark.llvm
DEVICE = "x86-avx512-vnni"


def _block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
                         nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16), nn.ReLU6(),
                         nn.Conv2d(16, 8, 1)).eval()


@pytest.fixture(scope="module")
def block_case(run_tvm):
    return blocks.block_case(_block(), 128, ((), ("bias",), ("adaround", "bias"), ("adaround_conv",)), run_tvm)


def test_registered():
    assert {"adaround", "adaround_conv"} <= set(CORRECTIONS)


def _mse(out, ref) -> float:
    return float(((out - ref) ** 2).mean())


def test_learned_rounding_lowers_the_integer_programs_error(block_case):
    """Measured at registration: bias 3.7e-6 -> adaround+bias 2.4e-6; none 2.3e-5 -> adaround_conv 5.9e-6."""
    _, _, ref, q, out = block_case
    err = {c: _mse(o, ref) for c, o in out.items()}
    assert err[("adaround", "bias")] < 0.8 * err[("bias",)], err
    assert err[("adaround_conv",)] < 0.5 * err[()], err


def test_adaround_learns_the_depthwise_layers_and_adaround_conv_all(block_case):
    _, _, _, q, _ = block_case
    for corr, kinds in ((("adaround", "bias"), {"depthwise_conv2d"}),
                        (("adaround_conv",), {"depthwise_conv2d", "conv2d"})):
        ops = q[corr].strategy.ops
        learned = {c.kind for c in ops.values() if c.weight_round is not None}
        assert learned == kinds, (corr, learned)


def test_weights_move_at_most_one_step_and_realize_bakes_the_learned_integers(block_case):
    _, _, _, q, _ = block_case
    s = q[("adaround", "bias")]
    g = corrected_graph(s.graph, s.strategy)
    moved = 0
    for node in s.graph.nodes:
        if node.kind != "depthwise_conv2d":
            continue
        bits = s.strategy.ops[node.name].weight_bits
        up = rounding.decode(s.strategy.ops[node.name].weight_round, node.weight.shape)
        ws, _, qp = rounding.grid(node.weight, node.kind, bits)
        expect = np.clip(np.floor(ws) + up, qp.qmin, qp.qmax)
        baked = quantize_weight(g.node(node.name).weight, weight_qparams(g.node(node.name).weight, 0, bits))
        np.testing.assert_array_equal(baked, expect)  # the grid survives: realize rounds to these integers
        nearest = quantize_weight(node.weight, weight_qparams(node.weight, 0, bits))
        assert np.abs(baked.astype(int) - nearest).max() <= 1
        moved += int((baked != nearest).sum())
    assert moved > 0  # it learned something other than round-to-nearest


def test_strategy_replays_the_learned_rounding_bit_for_bit(block_case, tmp_path, run_tvm):
    net, test, _, q, out = block_case
    s = q[("adaround", "bias")]
    path = tmp_path / "strategy.json"
    s.strategy.save(path)
    replay = quantize(load_model(net, example_inputs=(torch.from_numpy(test[:2]),)), DEVICE,
                      strategy=Strategy.load(path))
    np.testing.assert_array_equal(run_tvm(replay.realized.mod, test), out[("adaround", "bias")])


def test_rounding_bits_round_trip_and_reject_garbage():
    rng = np.random.default_rng(0)
    up = rng.random((16, 1, 3, 3)) > 0.5
    np.testing.assert_array_equal(rounding.decode(rounding.encode(up), up.shape), up)
    with pytest.raises(QuantizeError, match="weight_round"):
        rounding.decode(rounding.encode(up), (32, 1, 3, 3))
    with pytest.raises(QuantizeError, match="corrupt"):
        rounding.decode("not base64 zlib", up.shape)
