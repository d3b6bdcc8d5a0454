"""Realized integer kernels are bit-exact against the independent numpy reference.

Each case quantizes a tiny torch model with hago, runs the realized Relax
program, and recomputes the same integer pipeline with ``intref`` from the
constants hago baked in (quantized weights, int32 bias) and the calibrated
edge parameters. The float outputs are compared for exact equality: the last
step on both sides is the same float32 dequantize of identical integers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import intref
from hago.compiler import quantize
from hago.hwspec import HardwareSpec
from irstats import heavy_kernels

pytestmark = pytest.mark.llvm

SPEC = HardwareSpec.load("x86-avx512-vnni")


def _run(realized_mod, x, run_tvm):
    return run_tvm(realized_mod, x)


def _edge(q, edge):
    return q.strategy.resolved(edge).qparams


def _weights_are_independent(q, node, w):
    """hago's weight quantization equals the textbook symmetric per-channel one."""
    layer = q.realized.layers[node]
    axis = 0 if w.ndim == 4 else 1
    red = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=red) / 127.0
    np.testing.assert_allclose(layer.weight_scale, scale, rtol=1e-6)
    shape = [1] * w.ndim
    shape[axis] = -1
    np.testing.assert_array_equal(layer.weight_q, np.clip(np.round(w / scale.reshape(shape)), -127, 127))
    return layer


def _requant_ref(acc, layer, x_qp, y_qp, node_axis_shape):
    real = float(x_qp.scale) * layer.weight_scale.astype(np.float64) / float(y_qp.scale)
    mult, shift = intref.decompose_scale(real)
    np.testing.assert_array_equal(layer.multiplier, mult)
    np.testing.assert_array_equal(layer.shift, shift)
    return intref.requantize_fixed_point(
        acc.astype(np.int64) + layer.bias_i32.reshape(node_axis_shape), mult.reshape(node_axis_shape),
        shift.reshape(node_axis_shape), int(y_qp.zero_point), y_qp.qmin, y_qp.qmax, out_dtype=np.uint8)


def _quant_in(x, qp):
    return intref.quantize(x, float(qp.scale), int(qp.zero_point), 0, 255, out_dtype=np.uint8)


CONV_CASES = [
    dict(cin=3, cout=8, k=3, stride=1, padding=1, dilation=1, groups=1, hw=9),
    dict(cin=4, cout=6, k=3, stride=2, padding=1, dilation=1, groups=1, hw=11),
    dict(cin=5, cout=7, k=1, stride=1, padding=0, dilation=1, groups=1, hw=6),
    dict(cin=4, cout=8, k=3, stride=1, padding=2, dilation=2, groups=1, hw=10),
    dict(cin=8, cout=8, k=3, stride=1, padding=1, dilation=1, groups=8, hw=8),  # depthwise
    dict(cin=6, cout=6, k=5, stride=2, padding=2, dilation=1, groups=2, hw=12),  # grouped
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "k{k}s{stride}p{padding}d{dilation}g{groups}".format(**c))
@pytest.mark.parametrize("scale", [0.05, 3.0])
def test_conv_bias_relu_bit_exact(case, scale, run_tvm):
    torch.manual_seed(case["cin"] * 7 + case["k"])
    conv = nn.Conv2d(case["cin"], case["cout"], case["k"], case["stride"], case["padding"], case["dilation"],
                     case["groups"])
    model = nn.Sequential(conv, nn.ReLU()).eval()
    rng = np.random.default_rng(1)
    shape = (4, case["cin"], case["hw"], case["hw"])
    calib = (rng.standard_normal((32, *shape[1:])) * scale + 0.3 * scale).astype(np.float32)
    x = (rng.standard_normal(shape) * scale + 0.3 * scale).astype(np.float32)
    calib = np.concatenate([calib, x])  # no clipping: the float check below measures rounding only
    q = quantize(model, SPEC, {"input": calib}, calibrator="minmax", example_inputs=(torch.from_numpy(x),))
    conv_node = next(n.name for n in q.graph.nodes if n.weighted)
    layer = _weights_are_independent(q, conv_node, conv.weight.detach().numpy())

    x_qp, y_qp = _edge(q, q.graph.nodes[0].inputs[0]), _edge(q, conv_node)
    assert int(x_qp.zero_point) != 0  # the padding-with-zero-point path is exercised
    xq = _quant_in(x, x_qp)
    acc = intref.conv2d_int(xq, layer.weight_q.astype(np.int8), int(x_qp.zero_point), (case["stride"],) * 2,
                            (case["padding"],) * 4, (case["dilation"],) * 2, case["groups"])
    yq = intref.relu_int(_requant_ref(acc, layer, x_qp, y_qp, (1, -1, 1, 1)), int(y_qp.zero_point))
    expected = intref.dequantize(yq, float(y_qp.scale), int(y_qp.zero_point))
    got = _run(q.realized.mod, x, run_tvm)
    np.testing.assert_array_equal(got, expected)
    # and the quantized model still computes the float function
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max()


@pytest.mark.parametrize("k,n,scale", [(16, 8, 0.1), (37, 5, 2.0), (64, 33, 10.0)])
def test_dense_bias_relu_bit_exact(k, n, scale, run_tvm):
    torch.manual_seed(k)
    fc = nn.Linear(k, n)
    model = nn.Sequential(fc, nn.ReLU()).eval()
    rng = np.random.default_rng(k)
    calib = (rng.standard_normal((64, k)) * scale - 0.2 * scale).astype(np.float32)
    x = (rng.standard_normal((7, k)) * scale - 0.2 * scale).astype(np.float32)
    q = quantize(model, SPEC, {"input": calib}, calibrator="minmax", example_inputs=(torch.from_numpy(x),))
    node = next(nd.name for nd in q.graph.nodes if nd.weighted)
    layer = _weights_are_independent(q, node, fc.weight.detach().numpy().T)
    x_qp, y_qp = _edge(q, q.graph.nodes[0].inputs[0]), _edge(q, node)
    xq = _quant_in(x, x_qp)
    acc = intref.dense_int(xq, layer.weight_q.astype(np.int8), int(x_qp.zero_point))
    yq = intref.relu_int(_requant_ref(acc, layer, x_qp, y_qp, (-1,)), int(y_qp.zero_point))
    np.testing.assert_array_equal(_run(q.realized.mod, x, run_tvm),
                                  intref.dequantize(yq, float(y_qp.scale), int(y_qp.zero_point)))




@pytest.mark.parametrize("scale_b", [1.0, 7.5])
def test_add_and_relu_bit_exact(scale_b, run_tvm):
    torch.manual_seed(3)
    model = nn.Sequential(_TwoBranchAddCore(scale_b)).eval()
    rng = np.random.default_rng(5)
    calib = rng.standard_normal((32, 3, 5, 5)).astype(np.float32)
    x = rng.standard_normal((3, 3, 5, 5)).astype(np.float32)
    calib = np.concatenate([calib, x])
    q = quantize(model, SPEC, {"input": calib}, calibrator="minmax", example_inputs=(torch.from_numpy(x),))
    kinds = {n.kind: n.name for n in q.graph.nodes}
    assert {"conv2d", "add", "relu"} <= set(kinds)
    assert all(c.mode == "integer" for c in q.strategy.ops.values())
    convs = [n for n in q.graph.nodes if n.weighted]
    x_qp = _edge(q, convs[0].inputs[0])
    xq = _quant_in(x, x_qp)
    branch = []
    for node in convs:
        layer = q.realized.layers[node.name]
        acc = intref.conv2d_int(xq, layer.weight_q.astype(np.int8), int(x_qp.zero_point))
        branch.append((_requant_ref(acc, layer, x_qp, _edge(q, node.name), (1, -1, 1, 1)), _edge(q, node.name)))
    adds = [n.name for n in q.graph.nodes if n.kind == "add"]
    t_qp, out_qp = _edge(q, adds[0]), _edge(q, adds[1])
    assert int(t_qp.zero_point) != 0  # relu must clamp at a non-zero zero point
    (a, pa), (b, pb) = branch
    t = intref.add_int_fixed(a, float(pa.scale), int(pa.zero_point), b, float(pb.scale), int(pb.zero_point),
                             float(t_qp.scale), int(t_qp.zero_point), 0, 255, out_dtype=np.uint8)
    r = intref.relu_int(t, int(t_qp.zero_point))
    y = intref.add_int_fixed(r, float(t_qp.scale), int(t_qp.zero_point), t, float(t_qp.scale), int(t_qp.zero_point),
                             float(out_qp.scale), int(out_qp.zero_point), 0, 255, out_dtype=np.uint8)
    got = _run(q.realized.mod, x, run_tvm)
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    # the last add feeds only the graph output, so it is dequantized from its integer result
    np.testing.assert_array_equal(got, intref.dequantize(y, float(out_qp.scale), int(out_qp.zero_point)))


class _TwoBranchAddCore(nn.Module):
    def __init__(self, scale_b: float):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.b.weight.mul_(scale_b)

    def forward(self, x):
        t = self.a(x) + self.b(x)
        return torch.relu(t) + t  # t feeds relu and add, so its range keeps negatives: zp != 0


def test_realized_kernels_are_integer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = np.random.default_rng(0).standard_normal((8, 2, 6, 6)).astype(np.float32)
    q = quantize(model, SPEC, {"input": x}, calibrator="minmax", example_inputs=(torch.from_numpy(x[:2]),))
    kernels = heavy_kernels(q.realized.mod)
    assert len(kernels) == 2
    assert all(k.integer for k in kernels), kernels
    assert kernels[0].input_dtypes == ("uint8", "int8")


def test_dead_channel_bias_fits_int32(run_tvm):
    """A batch-norm-dead channel (|w| ~ 3e-9, bias -1.2; EfficientNet-Lite0 has them) must not overflow int32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight[1].mul_(3e-9)
        conv.bias[1] = -1.2
    model = nn.Sequential(conv).eval()
    rng = np.random.default_rng(2)
    calib = (rng.standard_normal((32, 4, 6, 6)) * 0.01).astype(np.float32)  # a small input scale
    x = calib[:4]
    q = quantize(model, SPEC, {"input": calib}, calibrator="minmax", example_inputs=(torch.from_numpy(x),))
    node = next(n.name for n in q.graph.nodes if n.weighted)
    layer = q.realized.layers[node]
    sx = float(_edge(q, q.graph.nodes[0].inputs[0]).scale)
    assert np.abs(layer.bias_i32).max() <= 2**30
    assert layer.weight_scale[1] >= 1.2 / (sx * 2**30) * (1 - 1e-6)  # only the dead channel is floored
    np.testing.assert_allclose(layer.weight_scale[[0, 2]],
                               np.abs(conv.weight.detach().numpy()[[0, 2]]).max(axis=(1, 2, 3)) / 127, rtol=1e-6)
    got, ref = _run(q.realized.mod, x, run_tvm), model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(got[:, 1] - ref[:, 1]).max() < 0.02  # the dead channel still outputs its bias
