"""Every op either runs or falls back: one op pattern per tiny ONNX file, exported the way users export.

Each pattern of ``corpus.PATTERNS`` (MobileNetV3 / EfficientNet / transformer
element-wise ops, resize, transposed, 1-D and grouped convs) is exported
with ``torch.onnx.export(dynamo=False)`` and a dynamic batch, compiled with
``hago.compile``, and checked three ways:

* the FP32 build computes what ONNX Runtime computes, to 1e-4;
* the quantized build runs, is finite and stays close to FP32;
* ops hago cannot quantize run in float and the report names them with a reason.

Conv1d and grouped convs must take the integer path and are compared bit for
bit with the independent numpy reference (``intref``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import corpus
import intref
from hago.compiler import compile as hago_compile
from hago.compiler import static_pair
from hago.errors import FrontendError
from hago.hwspec import HardwareSpec
from irstats import heavy_kernels

pytestmark = pytest.mark.llvm

X86 = "x86-avx512-vnni"
N_CALIB = 32
#: Quantized vs FP32, as a fraction of the output's largest magnitude. Each pattern has one or two integer
#: layers between float ops; an 8-bit edge rounds by at most half a step (range / 510) and the conv/dense sums
#: a few dozen such errors, which mostly cancel: measured errors are 0.1-1.5% of the range. A wrong scale,
#: zero point or sign gives errors of the order of the range itself, so 5% separates the two with margin.
QUANT_TOL = 0.05


@pytest.fixture(scope="module", params=list(corpus.PATTERNS))
def built(request, tmp_path_factory):
    """``(name, case, onnx path, CompileResult)`` for one pattern compiled for x86."""
    name = request.param
    case = corpus.PATTERNS[name]
    path = case.export(tmp_path_factory.mktemp(name) / f"{name}.onnx")
    calib = case.samples(N_CALIB)
    result = hago_compile(path, X86, {"x": calib}, measure=False)
    return name, case, path, result


def test_fp32_build_matches_onnxruntime(built):
    _, case, path, result = built
    x = case.samples(3, seed=5)
    np.testing.assert_allclose(corpus.run_build(result.fp32_executable, x), corpus.ort_run(path, x),
                               rtol=corpus.FP32_TOL, atol=corpus.FP32_TOL)


def test_quantized_build_runs_close_to_fp32(built):
    _, case, path, result = built
    x = case.samples(3, seed=5)
    ref = corpus.ort_run(path, x)
    got = corpus.run_build(result.int_executable, x)
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert np.abs(got - ref).max() <= QUANT_TOL * np.abs(ref).max()
    assert result.report["ops"]["integer"] >= 1  # the conv/dense around the pattern is integer


def test_report_names_the_ops_that_fell_back(built):
    _, case, _, result = built
    report = result.report
    floats = report["float_ops"]
    assert report["ops"]["float"] == len(floats)
    assert all(f["reason"] for f in floats)
    for f in floats:  # the report and the strategy agree
        assert result.strategy.ops[f["name"]].mode == "float"
    expect = case.expect
    if "float_ops" in expect:
        assert len(floats) == expect["float_ops"], floats
    reasons = " ".join(f["reason"] for f in floats)
    for op in expect.get("fallback", []):
        assert f"unsupported op {op}:" in reasons, (op, floats)
    for kind in expect.get("integer", []):
        modes = [c.mode for c in result.strategy.ops.values() if c.kind == kind]
        assert modes and set(modes) == {"integer"}, (kind, modes)
    if "note" in expect:
        assert any(expect["note"] in n for n in report["notes"]), report["notes"]
    # every conv and dense of these patterns is integer
    for name, choice in result.strategy.ops.items():
        if choice.kind in ("conv2d", "depthwise_conv2d", "dense"):
            assert choice.mode == "integer", (name, choice.reason)


@pytest.mark.skipif(corpus.NO_ARM_TOOLCHAIN is not None, reason=str(corpus.NO_ARM_TOOLCHAIN))
@pytest.mark.parametrize("name", list(corpus.PATTERNS))
def test_pattern_cross_compiles_for_rpi4(name, tmp_path):
    case = corpus.PATTERNS[name]
    path = case.export(tmp_path / f"{name}.onnx")
    result = hago_compile(path, "rpi4", {"x": case.samples(N_CALIB)}, measure=False, out_dir=tmp_path / "out")
    assert corpus.is_aarch64_elf(tmp_path / "out" / "model.so")
    assert result.report["ops"]["integer"] >= 1


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_recurrent_layers_are_refused_in_one_line_or_run(cell, tmp_path):
    """TVM's ONNX importer has no LSTM (and, in 0.27, no GRU): one line naming the operator, no traceback."""
    case = corpus.Case(lambda: corpus.Recurrent(getattr(nn, cell)), (1, 6, 16))
    path = case.export(tmp_path / f"{cell}.onnx")
    try:
        result = hago_compile(path, X86, {"x": case.samples(N_CALIB)}, measure=False)
    except FrontendError as e:
        msg = str(e)
        assert "\n" not in msg and cell in msg and "does not support" in msg
        return
    assert cell != "LSTM", "LSTM is expected to be refused by TVM's importer"
    x = case.samples(2, seed=3)
    np.testing.assert_allclose(corpus.run_build(result.fp32_executable, x), corpus.ort_run(path, x),
                               rtol=corpus.FP32_TOL, atol=corpus.FP32_TOL)


# --------------------------------------------------------------------------- bit-exact integer convs

def _conv_layer(result, kind="conv2d"):
    nodes = [n for n in result.graph.nodes if n.kind == kind]
    assert len(nodes) == 1, [n.name for n in result.graph.nodes]
    node = nodes[0]
    assert result.strategy.ops[node.name].mode == "integer", result.strategy.ops[node.name].reason
    return node, result.realized.layers[node.name]


def _independent_weights(layer, w: np.ndarray) -> None:
    """hago's weights equal the textbook symmetric per-output-channel int8 quantization of torch's."""
    flat = w.reshape(w.shape[0], -1)
    scale = np.abs(flat).max(axis=1) / 127.0
    np.testing.assert_allclose(layer.weight_scale, scale, rtol=1e-6)
    np.testing.assert_array_equal(layer.weight_q.reshape(w.shape[0], -1),
                                  np.clip(np.round(flat / scale[:, None]), -127, 127))


def _expected(result, node, layer, x, acc_fn, ndim):
    """intref's output of ``relu(requantize(acc_fn(quantize(x)) + bias))``, dequantized."""
    strat = result.strategy
    x_qp, y_qp = strat.resolved(node.inputs[0]).qparams, strat.resolved(node.name).qparams
    out_qp = strat.resolved(result.graph.outputs[0]).qparams
    assert (out_qp.scale, out_qp.zero_point) == (y_qp.scale, y_qp.zero_point)  # relu / squeeze keep the scale
    xdt = np.uint8 if x_qp.dtype.startswith("u") else np.int8
    xq = intref.quantize(x, float(x_qp.scale), int(x_qp.zero_point), x_qp.qmin, x_qp.qmax, out_dtype=xdt)
    assert int(x_qp.zero_point) != 0  # the padding-with-zero-point path is exercised
    acc = acc_fn(xq, int(x_qp.zero_point)).astype(np.int64)
    shape = (1, -1) + (1,) * (ndim - 2)
    real = float(x_qp.scale) * layer.weight_scale.astype(np.float64) / float(y_qp.scale)
    mult, shift = intref.decompose_scale(real)
    np.testing.assert_array_equal(layer.multiplier, mult)
    np.testing.assert_array_equal(layer.shift, shift)
    ydt = np.uint8 if y_qp.dtype.startswith("u") else np.int8
    yq = intref.requantize_fixed_point(acc + layer.bias_i32.reshape(shape), mult.reshape(shape), shift.reshape(shape),
                                       int(y_qp.zero_point), y_qp.qmin, y_qp.qmax, out_dtype=ydt)
    yq = intref.relu_int(yq, int(y_qp.zero_point))
    assert (yq != int(y_qp.zero_point)).mean() > 0.2  # not a test of ReLU's zeros
    return intref.dequantize(yq, float(y_qp.scale), int(y_qp.zero_point))


def _compile_tiny(model, shape, device, tmp_path, seed=0):
    torch.manual_seed(seed)
    model = model.eval()
    path = corpus.export_onnx(model, torch.zeros(*shape), tmp_path / "m.onnx")
    rng = np.random.default_rng(seed)
    calib = (rng.standard_normal((N_CALIB, *shape[1:])) + 0.8).astype(np.float32)  # asymmetric: zero point != 0
    x = (rng.standard_normal((3, *shape[1:])) + 0.8).astype(np.float32)
    calib = np.concatenate([calib, x])  # no clipping: the checks measure rounding only
    return hago_compile(path, device, {"x": calib}, measure=False, corrections=()), x


CONV1D = {
    "plain": dict(cin=4, cout=8, k=5, stride=2, padding=2, groups=1, kind="conv2d"),
    "depthwise": dict(cin=8, cout=8, k=5, stride=1, padding=2, groups=8, kind="depthwise_conv2d"),
    "grouped": dict(cin=8, cout=8, k=3, stride=1, padding=1, groups=2, kind="conv2d"),
}


@pytest.mark.parametrize("device", [X86, "rpi4"])
@pytest.mark.parametrize("variant", list(CONV1D))
def test_conv1d_is_integer_and_bit_exact(variant, device, tmp_path, run_tvm):
    """A Conv1d runs as an integer conv2d of unit height; its output is intref's 1-D conv, bit for bit."""
    c = CONV1D[variant]
    torch.manual_seed(3)
    conv = nn.Conv1d(c["cin"], c["cout"], c["k"], stride=c["stride"], padding=c["padding"], groups=c["groups"])
    result, x = _compile_tiny(nn.Sequential(conv, nn.ReLU()), (1, c["cin"], 33), device, tmp_path)
    node, layer = _conv_layer(result, c["kind"])
    w = conv.weight.detach().numpy()
    _independent_weights(layer, w)
    wq = layer.weight_q.reshape(w.shape).astype(np.int8)  # [O, I, 1, K] -> [O, I, K]
    pad = (c["padding"],) * 2
    expected = _expected(result, node, layer, x, lambda xq, zp: intref.conv1d_int(
        xq, wq, zp, stride=c["stride"], padding=pad, groups=c["groups"]), ndim=3)
    _check_builds(result, device, x, expected, run_tvm)
    assert result.report["ops"]["integer"] >= 3  # conv, relu, squeeze: nothing of the 1-D layer runs in float


GROUPED = {
    "generic": dict(cin=8, cout=12, groups=4, hw=7),  # 2 in / 3 out per group: hago's generic integer conv
    "vnni": dict(cin=32, cout=32, groups=2, hw=6),  # 16 in / 16 out per group: the VNNI kernel, per group
}


@pytest.mark.parametrize("device", [X86, "rpi4"])
@pytest.mark.parametrize("variant", list(GROUPED))
def test_grouped_conv_is_integer_and_bit_exact(variant, device, tmp_path, run_tvm):
    c = GROUPED[variant]
    torch.manual_seed(5)
    conv = nn.Conv2d(c["cin"], c["cout"], 3, padding=1, groups=c["groups"])
    result, x = _compile_tiny(nn.Sequential(conv, nn.ReLU()), (1, c["cin"], c["hw"], c["hw"]), device, tmp_path)
    node, layer = _conv_layer(result)
    w = conv.weight.detach().numpy()
    _independent_weights(layer, w)
    wq = layer.weight_q.astype(np.int8)
    expected = _expected(result, node, layer, x,
                         lambda xq, zp: intref.conv2d_int(xq, wq, zp, padding=(1, 1, 1, 1), groups=c["groups"]),
                         ndim=4)
    _check_builds(result, device, x, expected, run_tvm)
    if device == X86:
        _, int_mod = static_pair(result.quantized, HardwareSpec.load(X86), 1)
        kernels = heavy_kernels(int_mod)
        assert len(kernels) == 1 and kernels[0].integer, kernels
        want = "hago_conv2d_nchwc_vnni" if variant == "vnni" else "relax.nn.conv2d"
        assert kernels[0].op == want


def _check_builds(result, device, x, expected, run_tvm):
    """The realized program (on this CPU) and, for x86, the static deployable build equal ``expected``."""
    np.testing.assert_array_equal(run_tvm(result.realized.mod, x), expected)
    if device == X86:  # the build hago exports: static batch 1, hago's kernels
        np.testing.assert_array_equal(corpus.run_build(result.int_executable, x), expected)


def test_arm_int8_kernels_skip_grouped_convs():
    """rpi4's NEON kernel swap takes the plain conv and leaves the grouped one to the generic integer conv."""
    import tvm
    from tvm import relax

    from hago.backends.arm.schedule import apply_arm_schedules
    from hago.compiler import quantize

    case = corpus.PATTERNS["grouped_conv"]
    torch.manual_seed(0)
    model = case.make().eval()
    q = quantize(model, "rpi4", {"x": case.samples(N_CALIB)},
                 example_inputs=(torch.from_numpy(case.samples(2)),))
    _, static = static_pair(q, HardwareSpec.load("rpi4"), 1)
    mod = apply_arm_schedules(static, HardwareSpec.load("rpi4"))
    arm, grouped = [], []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.name == "relax.call_tir" and e.args[0].name_hint.startswith("hago_arm_conv2d"):
                arm.append(e)
            elif e.op.name == "relax.nn.conv2d" and int(e.attrs.groups) > 1:
                grouped.append(e)

    relax.analysis.post_order_visit(mod["main"], visit)
    assert len(arm) == 1
    assert len(grouped) == 1 and str(grouped[0].args[0].ty.dtype) == "int8"
    assert str(grouped[0].ty.dtype) == "int32"


# --------------------------------------------------------------------------- prepare: the rewrites behind the above

def _ops(mod) -> list[str]:
    import tvm
    from tvm import relax

    names = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: names.append(e.op.name) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
        else None)
    return names


def test_importer_clip_and_pad_helpers_become_relax_ops(tmp_path):
    """ONNX Clip(0, 6) is a relax clip (integer, folded into the conv); a zero "same" pad joins the conv's padding."""
    import tvm

    from hago.frontend import load_model
    from hago.graph import analyze
    from hago.prepare import prepare

    relu6 = prepare(load_model(corpus.PATTERNS["relu6"].export(tmp_path / "relu6.onnx")))
    assert "relax.call_tir" not in _ops(relu6) and "relax.clip" in _ops(relu6)
    assert not [gv for gv, f in relu6.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]  # helpers dropped
    clip = next(n for n in analyze(relu6).nodes if n.kind == "clip")
    assert [float(a.value) for a in clip.call.args[1:]] == [0.0, 6.0]

    padded = prepare(load_model(corpus.PATTERNS["same_pad"].export(tmp_path / "pad.onnx")))
    assert "relax.call_tir" not in _ops(padded) and "relax.nn.pad" not in _ops(padded)
    conv = next(n for n in analyze(padded).nodes if n.kind == "conv2d")
    assert [int(p) for p in conv.call.attrs.padding] == [0, 0, 1, 1]  # (top, left, bottom, right)


class _InvertedClamp(nn.Module):
    """``clamp(min=2, max=1)``: ONNX Clip's max-then-min order gives 1 everywhere, a plain clip would give 2."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        return torch.clamp(self.conv(x), min=2.0, max=1.0)


def test_clip_with_min_above_max_keeps_onnx_semantics(tmp_path):
    torch.manual_seed(0)
    path = corpus.export_onnx(_InvertedClamp(), torch.zeros(*corpus.IMG), tmp_path / "clamp.onnx")
    case = corpus.PATTERNS["relu6"]
    result = hago_compile(path, X86, {"x": case.samples(N_CALIB)}, measure=False, corrections=())
    x = case.samples(2, seed=1)
    ref = corpus.ort_run(path, x)
    assert np.all(ref == 1.0)
    np.testing.assert_array_equal(corpus.run_build(result.fp32_executable, x), ref)


def test_conv1d_batch_norm_folds_on_the_torch_route(cpu_target):
    """Through the PyTorch API, BatchNorm1d after Conv1d folds into the conv2d it became, as in 2-D nets."""
    from hago.frontend import load_model
    from hago.graph import analyze
    from hago.prepare import prepare

    case = corpus.CORPUS["audio_cnn"]
    torch.manual_seed(0)
    model = case.make().eval()
    corpus._randomize_norm_stats(model)
    x = case.samples(3, seed=2)
    mod = prepare(load_model(model, example_inputs=(torch.from_numpy(x),)))
    ops = _ops(mod)
    assert "relax.nn.batch_norm" not in ops and "relax.multiply" not in ops and "relax.nn.conv1d" not in ops
    assert ops.count("relax.nn.conv2d") == 3 and ops.count("relax.expand_dims") == 1
    graph = analyze(mod)
    assert all(n.bias is not None for n in graph.nodes if n.kind == "conv2d")  # bias (and BN) fused
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target=cpu_target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
