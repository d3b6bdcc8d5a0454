"""Dynamic (run-time, per-row) activation quantization for integer dense layers (hago.dynamic).

A float op feeding an integer dense on a spec that lists ``activations.dynamic``
gets per-row uint8 parameters computed at run time instead of a calibrated range.
Checked here: annotate's rule, bit-exactness against a numpy reference written
from the formulas in hago/dynamic.py's docstring, and the accuracy it buys on
heavy-tailed rows (what BERT's GELU/layer-norm outputs look like).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hago.annotate import AnnotateConfig
from hago.compiler import quantize
from hago.hwspec import HardwareSpec
from hago.simulate import simulate

pytestmark = pytest.mark.llvm

VNNI = HardwareSpec.load("x86-avx512-vnni")


class ReluDense(nn.Module):
    """relu stays float (its input is the float graph input), so the dense reads a float edge."""

    def __init__(self, k: int = 48, n: int = 20):
        super().__init__()
        self.fc = nn.Linear(k, n)

    def forward(self, x):
        return self.fc(torch.relu(x))


def _rows(rng, m: int, k: int, outlier: float = 40.0) -> np.ndarray:
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, 3] *= outlier  # one heavy channel, as in transformer activations
    x *= rng.uniform(0.05, 3.0, size=(m, 1)).astype(np.float32)  # rows of very different magnitude
    return x


def _reference(x: np.ndarray, fc: nn.Linear, w_q: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """hago.dynamic's formulas in float32 numpy: per-row u8 quantize, int32 matmul, rescale."""
    f32 = np.float32
    r = np.maximum(x, f32(0))
    lo = np.minimum(r.min(axis=1, keepdims=True), f32(0))
    hi = np.maximum(r.max(axis=1, keepdims=True), f32(0))
    span = hi - lo
    scale = np.where(span > 0, span / f32(255), f32(1)).astype(f32)
    zp = np.clip(np.round(-lo / scale), 0, 255).astype(f32)
    q = np.clip(np.round(r * (f32(1) / scale)) + zp, 0, 255).astype(np.int64)
    acc = (q @ w_q.astype(np.int64)).astype(np.int32)
    centred = acc - zp.astype(np.int32) * w_q.astype(np.int64).sum(axis=0).astype(np.int32)
    bias = fc.bias.detach().numpy().astype(f32)
    return (centred.astype(f32) * scale) * w_scale.astype(f32) + bias


def _quantize(model, x, spec=VNNI, cfg=None):
    return quantize(model, spec, {"x": x}, calibrator="minmax", example_inputs=(torch.from_numpy(x[:4]),),
                    annotate_config=cfg)


def test_annotate_marks_float_to_dense_edges_dynamic_only_where_the_spec_allows():
    rng = np.random.default_rng(0)
    x = _rows(rng, 16, 48)
    model = ReluDense().eval()
    q = _quantize(model, x)
    relu = next(n for n in q.graph.nodes if n.kind == "relu")
    dense = next(n for n in q.graph.nodes if n.kind == "dense")
    assert q.strategy.ops[relu.name].mode == "float" and q.strategy.ops[dense.name].mode == "integer"
    edge = q.strategy.edges[relu.name]
    assert edge.dynamic and edge.bits == 8 and edge.qparams is None  # nothing calibrated for it
    # the graph input is not dynamic (its range is the calibration set's), nor is anything on AVX2
    assert not any(e.dynamic for k, e in q.strategy.edges.items() if k.startswith("input:"))
    assert not any(e.dynamic for e in _quantize(model, x, HardwareSpec.load("x86-avx2")).strategy.edges.values())
    off = _quantize(model, x, cfg=AnnotateConfig(dynamic=False)).strategy.edges[relu.name]
    assert not off.dynamic and off.qparams is not None
    # strategies round-trip the flag
    from hago.strategy import Strategy

    assert Strategy.from_json(q.strategy.to_json()).edges[relu.name].dynamic


def test_dynamic_dense_is_bit_exact_and_beats_a_static_range(run_tvm):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    model = ReluDense().eval()
    calib, x = _rows(rng, 64, 48), _rows(rng, 24, 48)
    q = _quantize(model, calib)
    dense = next(n.name for n in q.graph.nodes if n.kind == "dense")
    layer = q.realized.layers[dense]
    got = run_tvm(q.realized.mod, x, batch=24)
    np.testing.assert_array_equal(got, _reference(x, model.fc, layer.weight_q, layer.weight_scale))

    ref = model(torch.from_numpy(x)).detach().numpy()
    static = run_tvm(_quantize(model, calib, cfg=AnnotateConfig(dynamic=False)).realized.mod, x, batch=24)
    err_dyn, err_static = np.abs(got - ref).mean(), np.abs(static - ref).mean()
    assert err_dyn < 0.5 * err_static, (err_dyn, err_static)
    # the simulated twin quantizes the same way
    sim = run_tvm(simulate(q.graph, q.strategy), x, batch=24)
    assert np.abs(sim - got).max() <= 1e-3 * np.abs(ref).max()


class SharedInput(nn.Module):
    """Two dense layers reading one float edge, as a transformer's Q, K and V projections do."""

    def __init__(self, k: int = 48):
        super().__init__()
        self.q, self.k = nn.Linear(k, 16), nn.Linear(k, 24)

    def forward(self, x):  # x [N, 4, K]: on 3-d inputs each Linear reads its own reshape, as in a BERT
        r = torch.relu(x)
        return torch.cat([self.q(r), self.k(r)], dim=2)


def test_an_edge_read_by_several_denses_is_quantized_once(run_tvm):
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    model = SharedInput().eval()
    calib, x = _rows(rng, 64, 48).reshape(16, 4, 48), _rows(rng, 96, 48).reshape(24, 4, 48)
    q = _quantize(model, calib)
    dense_inputs = {n.inputs[0] for n in q.graph.nodes if n.kind == "dense"}
    assert len(dense_inputs) == 2  # two reshape edges of one tensor
    text = q.realized.mod.script(show_meta=False)
    assert text.count("R.min(") == 1 and text.count("R.max(") == 1  # one row range for both denses
    got = run_tvm(q.realized.mod, x, batch=24).reshape(24, 4, 40)
    layers = [q.realized.layers[n.name] for n in q.graph.nodes if n.kind == "dense"]
    ref = np.concatenate([_reference(x.reshape(96, 48), fc, layer.weight_q, layer.weight_scale)
                          for fc, layer in zip((model.q, model.k), layers)], axis=1)
    np.testing.assert_array_equal(got.reshape(96, 40), ref)
