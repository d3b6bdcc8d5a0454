"""End to end on the real model: the pretrained MNIST CNN and the real 10k test set.

One compile per session (ONNX route, x86-avx512-vnni, 500 calibration images
from MNIST's *training* split, evaluation on all 10,000 test images) feeds
every assertion here; it is the run ``make demo`` shows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import relax

from hago import zoo
from hago.compiler import compile as hago_compile
from hago.compiler import quantize
from irstats import heavy_kernels
from hago.strategy import Strategy

pytestmark = [pytest.mark.llvm, pytest.mark.slow]


@pytest.fixture(scope="session")
def mnist_assets(tmp_path_factory):
    return zoo.export_mnist_demo(tmp_path_factory.mktemp("mnist_demo"), n_calib=500)


@pytest.fixture(scope="session")
def mnist_build(mnist_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist_build")
    result = hago_compile(mnist_assets["model"], "x86-avx512-vnni", mnist_assets["calib"],
                          eval_data=mnist_assets["eval"], out_dir=out)
    return result, out


def test_int8_accuracy_on_the_real_test_set(mnist_build):
    result, _ = mnist_build
    r = result.report
    assert r["eval_samples"] == 10000
    assert r["corrections"] == ["bias"]  # compile's default (hago.compiler.DEFAULT_CORRECTIONS)
    assert r["fp32"]["accuracy"] == pytest.approx(0.9905, abs=1e-4)  # TVM FP32 reproduces torch's 99.05%
    assert r["quantized"]["accuracy"] >= 0.989
    assert r["agreement"] >= 0.995


def test_every_conv_and_dense_is_integer(mnist_build):
    result, _ = mnist_build
    kernels = heavy_kernels(result.realized.mod)
    assert sorted(k.op for k in kernels) == ["relax.matmul"] * 2 + ["relax.nn.conv2d"] * 2
    for k in kernels:
        assert k.input_dtypes == ("uint8", "int8") and k.output_dtype == "int32", k
    assert result.report["ops"] == {"integer": 10, "bf16": 0, "float": 0}
    script = result.realized.mod.script(show_meta=False)
    # float only at the edges: one quantize of the input, one float multiply of the final accumulator
    assert script.count("R.quantize(") == 1
    assert script.count("R.dequantize(") == 0
    assert "float32" not in "".join(l for l in script.splitlines() if "R.nn.conv2d" in l or "R.matmul" in l)


def test_outputs_are_written_and_loadable(mnist_build, mnist_test):
    result, out = mnist_build
    for name in ("model.so", "strategy.json", "report.json"):
        assert (out / name).is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "x86-avx512-vnni"
    assert report["fp32"]["latency_ms"] > 0 and report["quantized"]["latency_ms"] > 0
    assert set(report["ops"]) == {"integer", "bf16", "float"}
    assert 0 < report["quantized"]["weight_bytes"] < 0.3 * report["fp32"]["weight_bytes"]  # int8 weights
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cpu())
    direct = relax.VirtualMachine(result.int_executable, tvm.cpu())
    for x in mnist_test[0][:8]:  # the export is a batch-1 build
        xt = tvm.runtime.tensor(x[None])
        np.testing.assert_array_equal(vm["main"](xt).numpy(), direct["main"](xt).numpy())


def test_exported_build_runs_vnni_kernels(mnist_build):
    """The deployable build uses the packed u8 x s8 kernels and their vpdpbusd code."""
    result, _ = mnist_build
    from hago.compiler import static_pair
    from hago.hwspec import HardwareSpec

    _, int_mod = static_pair(result.quantized, HardwareSpec.load("x86-avx512-vnni"), 1)
    kernels = heavy_kernels(int_mod)
    assert sorted(k.op for k in kernels) == ["hago_conv2d_nchwc_vnni"] * 2 + ["hago_dense_vnni"] * 2
    assert all(k.integer for k in kernels)
    asm = result.int_executable.mod.imports[0].inspect_source("asm")
    assert asm.count("vpdpbusd") >= 4


def test_strategy_replay_is_bit_identical(mnist_build, mnist_assets, mnist_test, run_tvm):
    result, out = mnist_build
    strategy = Strategy.load(out / "strategy.json")
    assert strategy.graph_hash == result.report["graph_hash"]
    edges = {e: c for e, c in strategy.edges.items() if c.qparams is not None}
    assert edges and all(c.range is not None for c in edges.values())
    replayed = quantize(mnist_assets["model"], "x86-avx512-vnni", strategy=strategy)
    x = mnist_test[0][:256]
    np.testing.assert_array_equal(run_tvm(replayed.realized.mod, x), run_tvm(result.realized.mod, x))


def test_strategy_for_another_graph_is_refused(mnist_build):
    import torch
    from torch import nn

    from hago.errors import QuantizeError

    result, out = mnist_build
    other = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval()
    with pytest.raises(QuantizeError, match="strategy is for graph"):
        quantize(other, "x86-avx512-vnni", strategy=out / "strategy.json", example_inputs=(torch.zeros(1, 1, 8, 8),))


def test_local_measurements_use_the_spec_cores_unless_the_user_set_threads():
    """TVM alone sizes its pool to half the logical CPUs on x86 (1 thread on a 2-core CI machine)."""
    import os
    import subprocess
    import sys

    from hago.hwspec import HardwareSpec

    cores = HardwareSpec.load("x86-avx512-vnni").cores
    code = ("from hago.hwspec import HardwareSpec; from hago.measure import device_threads, pool_threads; "
            "device_threads(HardwareSpec.load('x86-avx512-vnni').cores); print(pool_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    run = lambda e: int(subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,  # noqa: E731
                                       check=True).stdout.split()[-1])
    assert cores == 2 and run(env) == cores
    assert run({**env, "TVM_NUM_THREADS": "1"}) == 1
