"""Empirical bias correction (hago.correct.bias) on real numbers.

A small conv net with 4-bit weights has a visible per-channel mean error in
its output; both forms of the correction (``bias``: each layer on its FP32
input; ``bias_sequential``: the whole quantized net, layer by layer) must
remove most of it in the *realized integer program* on data they were not
fitted on, survive a strategy JSON round trip
bit for bit, and leave the real MNIST CNN's accuracy where it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from hago import build as build_mod
from hago.annotate import AnnotateConfig
from hago.compiler import quantize
from hago.correct import CORRECTIONS, corrected_graph
from hago.errors import QuantizeError
from hago.frontend import load_model
from hago.simulate import simulate
from images import smooth_images

pytestmark = pytest.mark.llvm
DEVICE = "x86-avx512-vnni"


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 8, 1))
    return net.eval()


@pytest.fixture(scope="module")
def small_case(run_tvm):
    """One quantization per setting of the small net, and every program's outputs on the test images."""
    net = _small_net()
    calib, test = smooth_images(256, 1), smooth_images(256, 2)
    example = (torch.from_numpy(calib[:2]),)
    cfg = AnnotateConfig(weight_bits=4)
    mod = load_model(net, example_inputs=example)  # traced once for the three settings
    q = {c: quantize(mod, DEVICE, calib, annotate_config=cfg, corrections=c, batch_size=64)
         for c in ((), ("bias",), ("bias_sequential",))}
    with torch.no_grad():
        ref = net(torch.from_numpy(test)).numpy()
    out = {c: run_tvm(v.realized.mod, test) for c, v in q.items()}
    fixed = q[("bias",)]
    out["sim"] = run_tvm(simulate(corrected_graph(fixed.graph, fixed.strategy), fixed.strategy), test)
    return net, test, ref, q, out


def _run_fast(mod, x: np.ndarray, batch: int) -> np.ndarray:
    """hago's own (fused, parallel) host build at a static batch: much faster than tvm.compile's default."""
    ex = build_mod.build(build_mod.static_batch(mod, batch), build_mod.host_target(), "host")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[i:i + batch]))).numpy()
                           for i in range(0, len(x), batch)])


def _channel_mean_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs((out - ref).mean(axis=(0, 2, 3))).mean())


def test_registered():
    assert {"bias", "bias_sequential"} <= set(CORRECTIONS)
    with pytest.raises(QuantizeError, match="unknown correction"):  # before any work is done
        quantize(_small_net(), DEVICE, smooth_images(8, 0), example_inputs=(torch.zeros(1, 3, 16, 16),),
                 corrections=["nope"])


def test_bias_correction_removes_the_mean_error_of_the_integer_program(small_case):
    _, _, ref, q, out = small_case
    assert q[("bias",)].strategy.corrections == ["bias"] and q[()].strategy.corrections == []
    deltas = [c.bias_delta for c in q[("bias",)].strategy.ops.values() if c.mode == "integer" and c.kind == "conv2d"]
    assert len(deltas) == 3 and all(d is not None for d in deltas)
    e_plain, e_fixed = _channel_mean_error(out[()], ref), _channel_mean_error(out[("bias",)], ref)
    assert e_plain > 0.01 * ref.std(), e_plain  # 4-bit weights do shift the means (~2% of the output's std)
    assert e_fixed < 0.1 * e_plain, (e_fixed, e_plain)  # measured: 25x smaller
    # and the overall error shrinks with it (measured 0.0036 -> 0.0021)
    assert np.abs(out[("bias",)] - ref).mean() < 0.8 * np.abs(out[()] - ref).mean()
    # Nagel's sequential form (whole quantized net, layer by layer) removes it too (measured 58x)
    assert _channel_mean_error(out[("bias_sequential",)], ref) < 0.1 * e_plain


def test_corrected_simulation_tracks_the_corrected_integer_program(small_case):
    _, _, ref, _, out = small_case
    real = out[("bias",)]
    assert np.abs(out["sim"] - real).mean() < 0.25 * np.abs(ref - real).mean()


def test_strategy_json_replays_the_corrected_biases(small_case, tmp_path, run_tvm):
    net, test, _, q, out = small_case
    fixed = q[("bias",)]
    fixed.strategy.save(tmp_path / "s.json")
    replay = quantize(load_model(net, example_inputs=(torch.from_numpy(test[:2]),)), DEVICE,
                      strategy=tmp_path / "s.json")
    assert replay.strategy.corrections == ["bias"]
    for name, layer in fixed.realized.layers.items():
        np.testing.assert_array_equal(replay.realized.layers[name].bias_i32, layer.bias_i32)
    np.testing.assert_array_equal(run_tvm(replay.realized.mod, test), out[("bias",)])


def test_mnist_accuracy_does_not_drop(mnist_model, mnist_test, run_tvm):
    """The real MNIST CNN, corrected, stays at FP32's accuracy on 1000 test images it was not fitted on."""
    x, y = mnist_test
    calib, xs, ys = x[-200:], x[:1000], y[:1000]
    q = quantize(mnist_model, DEVICE, calib, example_inputs=(torch.from_numpy(x[:2]),), corrections=["bias"],
                 batch_size=100)
    with torch.no_grad():
        ref = mnist_model(torch.from_numpy(xs)).numpy()
    out = _run_fast(q.realized.mod, xs, 500)
    fp32_acc, acc = float((ref.argmax(1) == ys).mean()), float((out.argmax(1) == ys).mean())
    assert acc >= fp32_acc - 0.001, (acc, fp32_acc)  # at most one more error in 1000
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.995


def test_cli_option():
    from hago.cli import _corrections, build_parser

    args = build_parser().parse_args(["compile", "m.onnx", "--device", DEVICE, "--corrections", "bias"])
    assert _corrections(args.corrections) == ["bias"]
    assert _corrections("none") == [] and _corrections(None) is None


def test_deltas_do_not_depend_on_the_probe_batch_when_dense_rows_merge_the_batch():
    """A transformer's dense runs on ``[N*T, C]`` rows (batch merged into tokens): the correction must
    average over every row of every sample, so the deltas are the same whatever batch the probe runs at
    (a per-sample slice of the rows made them wrong and batch-dependent)."""
    import torch
    from torch import nn

    from hago.compiler import quantize

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x):  # x: [N, T, 16]
            n, t, c = x.shape
            return self.b(torch.relu(self.a(x.reshape(n * t, c)))).reshape(n, t, 8)

    torch.manual_seed(0)
    model = Tokens().eval()
    x = np.random.default_rng(5).standard_normal((16, 6, 16)).astype(np.float32) + 0.5
    deltas = {}
    for bs in (1, 8):
        q = quantize(model, "x86-avx512-vnni", {"x": x}, calibrator="minmax", corrections=("bias",),
                     batch_size=bs, example_inputs=(torch.from_numpy(x[:2]),))
        deltas[bs] = {n: np.asarray(op.bias_delta) for n, op in q.strategy.ops.items() if op.bias_delta is not None}
    assert deltas[1] and deltas[1].keys() == deltas[8].keys()
    for name in deltas[1]:
        np.testing.assert_allclose(deltas[1][name], deltas[8][name], rtol=1e-4, atol=1e-6)
