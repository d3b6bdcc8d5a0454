"""Static batches, as ``torch.onnx.export(model, x, path)`` writes them with its defaults.

Most ONNX files in the wild declare a batch of 1, often baked into ``Reshape``
targets too. hago relaxes the batch where ONNX Runtime confirms the relaxed
graph computes the same per-sample outputs (``hago.onnx_prep``), and otherwise
calibrates and evaluates in batches of the file's own size. Both routes are
exercised here on real exports made at test time.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from hago import zoo
from hago.cli import main
from hago.compiler import compile as hago_compile
from hago.compiler import quantize
from hago.errors import DataError
from hago.frontend import import_model, input_infos
from hago.graph import graph_hash
from hago.prepare import prepare

pytestmark = pytest.mark.llvm


def _export(model, example, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), **kw)
    return path


@pytest.fixture(scope="module")
def mnist_static(tmp_path_factory):
    """The real MNIST CNN exported with torch.onnx.export's defaults: dynamo, static batch 1, external data."""
    d = tmp_path_factory.mktemp("mnist_static")
    path = _export(zoo.mnist_cnn(), torch.zeros(1, 1, 28, 28), d / "mnist.onnx")
    x, y = zoo.mnist_data("test")
    name = input_infos(import_model(path).mod)[0].name
    np.savez(d / "calib.npz", **{name: x[2000:2100]})
    np.savez(d / "eval.npz", **{name: x[:300], "label": y[:300]})
    return d, path, name


def test_default_export_bakes_the_batch_into_a_reshape(mnist_static):
    """The case this file is about: without hago's relaxation, batch 64 cannot flow through this graph."""
    import onnx
    from onnx import numpy_helper

    _, path, _ = mnist_static
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    targets = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "Reshape"]
    assert any(t[0] == 1 for t in targets)


def test_static_batch_is_relaxed_and_hashes_like_a_dynamic_export(mnist_static, tmp_path):
    _, path, _ = mnist_static
    imp = import_model(path)
    assert imp.declared_batch == 1
    assert input_infos(imp.mod)[0].shape == (None, 1, 28, 28)
    assert "made symbolic" in imp.notes[0]
    dynamic = zoo.export_mnist_onnx(tmp_path / "dyn.onnx")  # TorchScript export, dynamic_axes
    assert graph_hash(prepare(imp.mod)) == graph_hash(prepare(import_model(dynamic).mod))


def test_cli_compiles_a_static_batch_file(mnist_static, capsys):
    d, path, name = mnist_static
    out = d / "out"
    argv = ["compile", str(path), "--device", "x86-avx512-vnni", "--calib", str(d / "calib.npz"),
            "--eval", str(d / "eval.npz"), "-o", str(out), "--no-measure"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["batch"] == 1 and report["eval_samples"] == 300
    assert report["quantized"]["accuracy"] >= report["fp32"]["accuracy"] - 0.01
    assert any("static batch of 1" in n for n in report["notes"])
    # the built library keeps the file's own input signature: batch 1
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cpu())
    x = zoo.mnist_data("test")[0][:1]
    assert vm["main"](tvm.runtime.tensor(x)).numpy().shape == (1, 10)
    with pytest.raises(Exception):
        vm["main"](tvm.runtime.tensor(np.concatenate([x, x])))


def test_batch_option_builds_another_batch_with_the_same_strategy(mnist_static, tmp_path):
    d, path, name = mnist_static
    one = hago_compile(path, "x86-avx512-vnni", d / "calib.npz", measure=False, corrections=[])
    four = hago_compile(path, "x86-avx512-vnni", strategy=one.strategy, batch=4, measure=False, out_dir=tmp_path)
    assert four.report["graph_hash"] == one.report["graph_hash"] and four.report["batch"] == 4
    x = zoo.mnist_data("test")[0][:4]
    got4 = relax.VirtualMachine(four.int_executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    vm1 = relax.VirtualMachine(one.int_executable, tvm.cpu())["main"]
    got1 = np.concatenate([vm1(tvm.runtime.tensor(x[i:i + 1])).numpy() for i in range(4)])
    np.testing.assert_array_equal(got4, got1)


class _BatchMixer(nn.Module):
    """Subtracts the batch mean: a graph whose outputs depend on the batch, so it must stay static."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y - y.mean(0, keepdim=True)
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("batch", [1, 4])
def test_a_batch_dependent_graph_keeps_its_static_batch(batch, tmp_path):
    torch.manual_seed(0)
    model = _BatchMixer().eval()
    path = _export(model, torch.randn(batch, 2, 5, 5), tmp_path / "mix.onnx", dynamo=False, input_names=["x"])
    imp = import_model(path)
    assert input_infos(imp.mod)[0].shape == (batch, 2, 5, 5)
    assert "depends on" in imp.notes[0]
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((4 * batch + 1, 2, 5, 5)).astype(np.float32)  # one sample too many
    evalx = rng.standard_normal((3 * batch, 2, 5, 5)).astype(np.float32)
    res = hago_compile(path, "x86-avx512-vnni", {"x": calib}, eval_data={"x": evalx}, measure=False)
    assert res.report["batch"] == batch and res.report["eval_samples"] == 3 * batch
    assert res.report["agreement"] >= 2 / 3
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(evalx[i:i + batch])).numpy()
                              for i in range(0, len(evalx), batch)])
    np.testing.assert_allclose(res.extras["eval_outputs"]["fp32"], ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match=f"fixed to a batch of {batch}"):
        hago_compile(path, "x86-avx512-vnni", strategy=res.strategy, batch=batch + 1, measure=False)


def test_too_few_samples_for_a_static_batch(tmp_path):
    path = _export(_BatchMixer().eval(), torch.randn(4, 2, 5, 5), tmp_path / "mix4.onnx", dynamo=False,
                   input_names=["x"])
    with pytest.raises(DataError, match="static batch is 4"):
        quantize(path, "x86-avx512-vnni", {"x": np.zeros((3, 2, 5, 5), np.float32)})


class _Fcn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))


def test_symbolic_spatial_dims_are_bound_from_the_calibration_data(tmp_path):
    torch.manual_seed(0)
    model = _Fcn().eval()
    path = _export(model, torch.randn(1, 3, 8, 8), tmp_path / "fcn.onnx", dynamo=False, input_names=["x"],
                   dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    calib = np.random.default_rng(0).standard_normal((8, 3, 12, 10)).astype(np.float32)
    res = hago_compile(path, "x86-avx512-vnni", {"x": calib}, eval_data={"x": calib}, measure=False)
    assert input_infos(res.fp32_module)[0].shape == (None, 3, 12, 10)
    assert any("H=12" in n and "W=10" in n for n in res.report["notes"])
    with torch.no_grad():
        np.testing.assert_allclose(res.extras["eval_outputs"]["fp32"], model(torch.from_numpy(calib)).numpy(),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match=r"x\[2\], x\[3\] are symbolic"):
        quantize(path, "x86-avx512-vnni", strategy=res.strategy)


@pytest.mark.parametrize("which", ["relaxed", "fixed"])
def test_search_on_static_batch_files(which, mnist_static, tmp_path):
    """``hago search`` on a relaxed file (the MNIST default export) and on a graph fixed to a batch of 4."""
    from hago.measure import LocalMeasurer
    from hago.search.run import search

    if which == "relaxed":
        d, path, name = mnist_static
        calib, evald, batch = d / "calib.npz", d / "eval.npz", 1
    else:
        torch.manual_seed(0)
        path = _export(_BatchMixer().eval(), torch.randn(4, 2, 5, 5), tmp_path / "mix.onnx", dynamo=False,
                       input_names=["x"])
        rng = np.random.default_rng(0)
        calib = {"x": rng.standard_normal((16, 2, 5, 5)).astype(np.float32)}
        evald = {"x": rng.standard_normal((10, 2, 5, 5)).astype(np.float32)}  # 2.5 batches: the tail is padded
        batch = 4
    out = tmp_path / "s"
    result = search(path, "x86-avx512-vnni", calib, evald, out_dir=out, algorithm="latency", accuracy_drop="50%",
                    max_trials=3, corrections=[], measurer=LocalMeasurer(timeout_s=60, repeat=2, min_repeat_ms=10))
    assert result.best is not None and result.best.latency_ms > 0
    report = json.loads((out / "report.json").read_text())
    assert report["batch"] == batch
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cpu())
    shape = input_infos(import_model(path).mod)[0].shape
    x = np.zeros((batch, *shape[1:]), np.float32)
    assert vm["main"](tvm.runtime.tensor(x)).numpy().shape[0] == batch


@pytest.mark.parametrize("device", ["rpi4", "cuda-t4"])
def test_static_batch_file_builds_for_boards_and_gpus(device, mnist_static, capsys):
    """The failure was the same on every device: calibration in batches of 64 against a batch-1 graph."""
    import shutil

    if device == "rpi4" and shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed: tools/install_arm.sh")
    d, path, name = mnist_static
    out = d / f"out-{device}"
    assert main(["compile", str(path), "--device", device, "--calib", str(d / "calib.npz"), "-o", str(out),
                 "--corrections", "none"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["batch"] == 1 and report["ops"]["integer"] == 10
