"""Multipoint layers in the realized integer program, bit-exact against a numpy reference of the format.

A dense and a conv with heavy-tailed 4-bit weights on real MNIST pixels get
extra points (``hago.correct.multipoint``). The realized program must compute
exactly: one integer kernel on the weight widened by the points' codes, each
extra channel's accumulator rescaled by ``a_j / s_c`` in fixed point (round
half away from zero) and added to its source channel, then the usual
requantize. ``intref`` recomputes that from the strategy's stored points and
the constants realize baked, for the plain program and for the static build
whose VNNI kernel gets the wider weight. Also: the integer program's error
against FP32 drops, and the simulated twin models the same layer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from tvm import relax

import intref
from hago import multipoint as mp
from hago.annotate import AnnotateConfig
from hago.compiler import quantize
from hago.correct import CorrectionContext
from hago.correct.multipoint import Multipoint
from hago.hwspec import HardwareSpec
from hago.pipeline import lower, realized_program
from hago.simulate import simulate
from hago.strategy import Strategy

pytestmark = pytest.mark.llvm

SPEC = HardwareSpec.load("x86-avx512-vnni")


def _heavy_tailed(make, seed: int) -> nn.Module:
    """``make()`` (a dense or conv layer, its bias from the seeded init) with Student-t (df 2) weights."""
    torch.manual_seed(seed)
    layer = make()
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.distributions.StudentT(2.0).sample(layer.weight.shape) * 0.05)
    return layer


@pytest.fixture(scope="module")
def cases(mnist_test, cpu_target):
    """Per kind: (model, held-out inputs, the plain 4-bit Quantized, the strategy with points, its program)."""
    x = mnist_test[0][:80]
    dense_in = np.ascontiguousarray(x[:, 0, ::4, ::4].reshape(len(x), 49))
    conv_in = np.ascontiguousarray(x[:, :, 7:21, 7:21])
    dense = nn.Sequential(_heavy_tailed(lambda: nn.Linear(49, 24), 0), nn.ReLU())
    conv = nn.Sequential(_heavy_tailed(lambda: nn.Conv2d(1, 24, 3, padding=1), 2), nn.ReLU())
    out = {}
    for kind, model, data in (("dense", dense, dense_in), ("conv", conv, conv_in)):
        model = model.eval()
        calib, held = data[:64], data[64:]
        q = quantize(model, SPEC, {"input": calib}, calibrator="minmax", example_inputs=(torch.from_numpy(held),),
                     annotate_config=AnnotateConfig(weight_bits=4), batch_size=32)
        strat = _with_points(q, cpu_target)
        out[kind] = (model, held, q, strat, realized_program(q.prepared, strat, SPEC))
    return out


def _with_points(q, target):
    """A copy of ``q``'s strategy (through its JSON) with extra points: as many as the layer has channels.

    With these seeds the greedy allocation gives one channel a third point (two levels of the sum)."""
    strat = Strategy.from_json(json.loads(json.dumps(q.strategy.to_json())))
    rep = Multipoint(budget=1.0, max_points=4).run(CorrectionContext(q.fp32, q.graph, strat, q.prepared.calib,
                                                                      target, 32))
    assert rep["layers"] == 1 and rep["extra_channels"] == 24 and rep["error_ratio"] < 0.05, rep
    return strat


def _node(q):
    return next(n for n in q.graph.nodes if n.weighted)


def _reference(q, strat, layer, x):
    """The integer format in numpy: widened kernel, fixed-point weighted sum, requantize, relu, dequantize."""
    node = _node(q)
    conv = node.kind != "dense"
    x_qp, y_qp = strat.resolved(node.inputs[0]).qparams, strat.resolved(node.name).qparams
    n = len(layer.weight_scale)
    pts = mp.ExtraPoints.from_json(strat.ops[node.name].multipoint, n, mp.to_rows(node.weight, node.kind).shape[1], 4)
    xq = intref.quantize(x, float(x_qp.scale), int(x_qp.zero_point), 0, 255, out_dtype=np.uint8)
    zx = int(x_qp.zero_point)
    if conv:
        wide = np.concatenate([layer.weight_q, pts.codes.reshape(len(pts), *layer.weight_q.shape[1:])])
        acc = intref.conv2d_int(xq, wide.astype(np.int8), zx, (1, 1), (1, 1, 1, 1)).astype(np.int64)
        acc = np.moveaxis(acc, 1, -1)  # channels last, like the dense
    else:
        wide = np.concatenate([layer.weight_q, pts.codes.T], axis=1)
        acc = intref.dense_int(xq, wide.astype(np.int8), zx).astype(np.int64)
    main = acc[..., :n] + layer.bias_i32.astype(np.int64)
    for j, c in enumerate(pts.channels):
        m, s = intref.decompose_scale(np.float64(pts.scales[j]) / np.float64(layer.weight_scale[c]))
        main[..., c] += intref.rescale_fixed_point(acc[..., n + j], m, s)
    mult, shift = intref.decompose_scale(float(x_qp.scale) * layer.weight_scale.astype(np.float64)
                                         / float(y_qp.scale))
    yq = intref.requantize_fixed_point(main, mult, shift, int(y_qp.zero_point), y_qp.qmin, y_qp.qmax,
                                       out_dtype=np.uint8)
    y = intref.dequantize(intref.relu_int(yq, int(y_qp.zero_point)), float(y_qp.scale), int(y_qp.zero_point))
    return (np.moveaxis(y, -1, 1) if conv else y), pts


def _kernel_widths(mod) -> list[int]:
    """The output channels of the VNNI kernels ``main`` calls (a blocked conv's ``C/16 x 16``)."""
    shapes = []

    def visit(e):
        if isinstance(e, relax.Call) and e.op.name == "relax.call_tir":
            name = e.args[0].name_hint.rstrip("0123456789")
            shape = [int(d) for d in e.ty.shape]
            if name in ("hago_dense_vnni", "hago_dense_int4_vnni"):  # [M, N], 4-bit: packed two per byte
                shapes.append(shape[-1])
            elif name in ("hago_conv2d_nchwc_vnni", "hago_conv2d_nchwc_int4_vnni"):  # NCHW16c
                shapes.append(shape[1] * shape[4])

    relax.analysis.post_order_visit(mod["main"], visit)
    return shapes


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_realized_multipoint_layer_is_bit_exact_and_closer_to_fp32(cases, kind, run_tvm):
    """Measured at registration (held-out MNIST pixels, 4-bit weights, a second point on every channel): the
    realized program's MSE against FP32 x0.041 (dense) / x0.0058 (conv) of the one-point program's."""
    model, held, q, strat, realized = cases[kind]  # realized: plain int32 matmul / conv2d on the wide weight
    expected, pts = _reference(q, strat, realized.layers[_node(q).name], held)
    assert np.bincount(pts.channels).max() >= 2  # some channel has two extra points: two levels of the sum
    multi = run_tvm(realized.mod, held)
    np.testing.assert_array_equal(multi, expected)
    # the static build: the backend's VNNI kernel sees just a wider weight (24 + 24 channels)
    static = lower(q.prepared, strat, SPEC, batch=len(held))[1]
    widths = _kernel_widths(static.mod)
    assert widths == [48], widths
    np.testing.assert_array_equal(run_tvm(static.mod, held, batch=len(held)), expected)
    # closer to FP32 than the same layer with one point, and the simulated twin models the same layer
    with torch.no_grad():
        ref = model(torch.from_numpy(held)).numpy()
    err_one = float(((run_tvm(q.realized.mod, held) - ref) ** 2).mean())
    assert float(((multi - ref) ** 2).mean()) < 0.25 * err_one
    twin = run_tvm(simulate(q.graph, strat), held)
    step = float(strat.resolved(_node(q).name).qparams.scale)
    assert np.abs(twin - multi).max() <= 1.01 * step  # at most one output step apart, as for any layer
    assert float(((twin - ref) ** 2).mean()) < 0.25 * err_one


class ReluDense(nn.Module):
    """relu stays float (it reads the graph input), so the dense's input edge is dynamic (per-row) on VNNI."""

    def __init__(self):
        super().__init__()
        self.fc = _heavy_tailed(lambda: nn.Linear(49, 20), 3)

    def forward(self, x):
        return self.fc(torch.relu(x))


def _dynamic_reference(x, fc, w_q, w_scale, pts):
    """hago.dynamic's per-row formulas in float32 numpy on the widened weight, then the float weighted sum."""
    f32 = np.float32
    r = np.maximum(x, f32(0))
    lo = np.minimum(r.min(axis=1, keepdims=True), f32(0))
    hi = np.maximum(r.max(axis=1, keepdims=True), f32(0))
    span = hi - lo
    scale = np.where(span > 0, span / f32(255), f32(1)).astype(f32)
    zp = np.clip(np.round(-lo / scale), 0, 255).astype(f32)
    q = np.clip(np.round(r * (f32(1) / scale)) + zp, 0, 255).astype(np.int64)
    wide = np.concatenate([w_q, pts.codes.T], axis=1).astype(np.int64)
    acc = (q @ wide).astype(np.int32)
    centred = acc - zp.astype(np.int32) * wide.sum(axis=0).astype(np.int32)
    y = (centred.astype(f32) * scale) * np.concatenate([w_scale, pts.scales]).astype(f32)
    n = w_q.shape[1]
    main = y[:, :n].copy()
    for j, c in enumerate(pts.channels):  # one point per channel here: one level
        main[:, c] = main[:, c] + y[:, n + j]
    return main + fc.bias.detach().numpy().astype(f32)


def test_dynamic_dense_takes_extra_points_bit_exact(mnist_test, run_tvm):
    x = np.ascontiguousarray(mnist_test[0][:80, 0, ::4, ::4].reshape(80, 49))
    calib, held = x[:64], x[64:]
    model = ReluDense().eval()
    q = quantize(model, SPEC, {"x": calib}, calibrator="minmax", example_inputs=(torch.from_numpy(held),),
                 annotate_config=AnnotateConfig(weight_bits=4), corrections=("multipoint",))
    node = _node(q)
    assert q.strategy.resolved(node.inputs[0]).dynamic
    layer = q.realized.layers[node.name]
    pts = mp.ExtraPoints.from_json(q.strategy.ops[node.name].multipoint, 20, 49, 4)
    assert len(pts) == 2 and len(set(pts.channels)) == 2  # the 10% budget of 20 channels
    got = run_tvm(q.realized.mod, held)
    np.testing.assert_array_equal(got, _dynamic_reference(held, model.fc, layer.weight_q, layer.weight_scale, pts))
    plain = Strategy.from_json(json.loads(json.dumps(q.strategy.to_json())))
    plain.ops[node.name].multipoint = None
    with torch.no_grad():
        ref = model(torch.from_numpy(held)).numpy()
    one = run_tvm(realized_program(q.prepared, plain, SPEC).mod, held)
    cols = sorted(set(pts.channels))  # the two channels with points: closer to FP32, the others unchanged
    assert ((got - ref)[:, cols] ** 2).mean() < 0.5 * ((one - ref)[:, cols] ** 2).mean()
    rest = [c for c in range(20) if c not in cols]
    np.testing.assert_array_equal(got[:, rest], one[:, rest])
