"""hago.measure.rpc against a local TVM tracker + RPC server posing as a board (key ``rpi4``).

The "board" runs x86 code (no aarch64 RPC server can run here), so the
library is a host build; everything else is the real path: tracker request,
upload, remote load into a VirtualMachine, remote time_evaluator. Servers bind
127.0.0.1 only and are terminated at module teardown.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import tvm
from tvm import relax

from hago import zoo
from conftest import local_rpc
from hago.errors import MeasureError
from hago.hwspec import HardwareSpec
from hago.measure.rpc import measure_rpc, parse_tracker, run_rpc

KEY = "rpi4"  # the key in hwspecs/rpi4.yaml


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracker():
    """``"127.0.0.1:PORT"`` of a tracker with one RPC server registered as ``rpi4``."""
    with local_rpc(KEY, port=9190) as addr:
        yield addr


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory, mnist_model, cpu_target):
    """The FP32 MNIST CNN built for this CPU and exported: what the fake board runs."""
    import torch

    from hago.frontend import load_model

    mod = load_model(mnist_model, example_inputs=(torch.zeros(1, 1, 28, 28),))
    path = tmp_path_factory.mktemp("rpc") / "model.so"
    tvm.compile(mod, target=cpu_target).export_library(str(path))
    return path


@pytest.fixture(scope="module")
def images():
    return zoo.mnist_data("test")[0][:32]


def test_run_rpc_output_equals_local_run(tracker, host_lib, images):
    out = run_rpc(host_lib, tracker, KEY, [images], timeout=60)
    local = relax.VirtualMachine(tvm.runtime.load_module(str(host_lib)), tvm.cpu())
    assert len(out) == 1 and np.array_equal(out[0], local["main"](tvm.runtime.tensor(images)).numpy())


def test_measure_rpc_times_main_with_spec_key(tracker, host_lib, images):
    m = measure_rpc(host_lib, HardwareSpec.load("rpi4"), tracker, inputs=[images], timeout=60, repeat=3,
                    min_repeat_ms=50)
    assert m.ok, m.error
    assert m.latency_ms > 0 and m.repeats == 3


def test_measure_rpc_unregistered_key_is_an_error_not_a_wait(tracker, host_lib, images):
    t0 = time.monotonic()
    m = measure_rpc(host_lib, None, tracker, "rpi5", [images], timeout=60)
    assert not m.ok and m.latency_ms is None
    assert "no RPC server registered as 'rpi5'" in m.error and "rpi4" in m.error
    assert time.monotonic() - t0 < 5


def test_measure_rpc_bad_library_is_an_error_and_the_board_recovers(tracker, tmp_path, host_lib, images):
    bad = tmp_path / "broken.so"
    bad.write_bytes(b"not a shared library")
    m = measure_rpc(bad, None, tracker, KEY, [images], timeout=60)
    assert not m.ok and "\n" not in m.error
    assert measure_rpc(host_lib, None, tracker, KEY, [images], timeout=60, repeat=1, min_repeat_ms=10).ok


def test_measure_rpc_unreachable_tracker_fails_fast(host_lib, images):
    t0 = time.monotonic()
    m = measure_rpc(host_lib, None, f"127.0.0.1:{_closed_port()}", KEY, [images], timeout=60)
    assert time.monotonic() - t0 < 5
    assert not m.ok and "unreachable" in m.error and "\n" not in m.error


def test_measure_rpc_needs_a_tracker(host_lib, images):
    m = measure_rpc(host_lib, HardwareSpec.load("rpi4"), inputs=[images])  # rpi4.yaml has tracker: null
    assert not m.ok and "no RPC tracker for rpi4" in m.error


def test_run_rpc_raises_one_line_measure_error(host_lib, images):
    with pytest.raises(MeasureError, match="unreachable"):
        run_rpc(host_lib, f"127.0.0.1:{_closed_port()}", KEY, [images], timeout=5)


@pytest.mark.parametrize("bad", ["localhost", "host:", ":9190", "host:http", "host:70000"])
def test_parse_tracker_rejects_malformed(bad):
    with pytest.raises(MeasureError, match="host:port"):
        parse_tracker(bad)


def test_compile_with_rpc_measures_through_the_tracker_on_a_local_device(tracker, tmp_path, capsys):
    """``--rpc`` given for a device that runs here was silently ignored; now the user's choice is used."""
    import json

    from hago.cli import main

    x = zoo.mnist_data("test")[0][:64]
    onnx = zoo.export_mnist_onnx(tmp_path / "mnist.onnx")
    np.savez(tmp_path / "calib.npz", input=x)
    out = tmp_path / "out"
    assert main(["compile", str(onnx), "--device", "x86-avx512-vnni", "--calib", str(tmp_path / "calib.npz"),
                 "--corrections", "none", "--rpc", tracker, "--key", KEY, "-o", str(out)]) == 0, \
        capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["fp32"]["latency_ms"] > 0 and report["quantized"]["latency_ms"] > 0
    assert "threads" not in report  # set only by local measurements: these went through the tracker
