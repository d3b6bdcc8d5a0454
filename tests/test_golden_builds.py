"""Builds must not change when code moves: MNIST for every device family against recorded golden values.

The goldens in ``tests/golden/`` were recorded from the code before the
backend restructure (issue 14) with ``HAGO_RECORD_GOLDEN=1 pytest
tests/test_golden_builds.py``. Each device compiles the real MNIST CNN
(ONNX route, 64 calibration images from MNIST's training split, default
corrections) and is compared exactly:

* ``strategy.json`` (every range, scale, zero point and correction);
* x86: the logits of the exported ``model.so`` on 8 test images, bit for bit;
* rpi4 / rpi5: the cross-compiled ``model.so`` run under qemu, bit for bit
  (skipped, with the reason, where the aarch64 toolchain or qemu is missing);
* cuda-t4: the generated CUDA source, byte for byte (SHA-256).

A deliberate change of numbers re-records the goldens and says why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hago import zoo

pytestmark = pytest.mark.llvm

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("HAGO_RECORD_GOLDEN") == "1"
N_IMAGES = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    onnx = zoo.export_mnist_onnx(d / "mnist.onnx")
    np.savez(d / "calib.npz", input=zoo.mnist_data("train")[0][:64])
    return d, onnx, zoo.mnist_data("test")[0][:N_IMAGES]


def _compile(assets, device: str) -> Path:
    from hago.cli import main

    d, onnx, _ = assets
    out = d / device
    assert main(["compile", str(onnx), "--device", device, "--calib", str(d / "calib.npz"), "-o", str(out),
                 "--no-measure"]) == 0
    return out


def _check(device: str, record: dict) -> None:
    path = GOLDEN / f"mnist_{device}.json"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        return
    want = json.loads(path.read_text())
    assert record["strategy"] == want["strategy"], "strategy.json changed"
    for key in sorted(set(want) - {"strategy"}):
        assert record[key] == want[key], f"{key} changed"


def _strategy(out: Path) -> dict:
    return json.loads((out / "strategy.json").read_text())


def _logits_record(logits: np.ndarray) -> dict:
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    return {"logits_sha256": hashlib.sha256(logits.tobytes()).hexdigest(),
            "argmax": [int(i) for i in logits.argmax(-1)]}


def test_x86_build_is_unchanged(assets):
    import tvm
    from tvm import relax

    out = _compile(assets, "x86-avx512-vnni")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cpu())
    x = assets[2]
    logits = np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1])).numpy() for i in range(len(x))])
    _check("x86-avx512-vnni", {"strategy": _strategy(out), **_logits_record(logits)})


@pytest.mark.parametrize("device", ["rpi4", "rpi5"])
def test_arm_build_is_unchanged_under_qemu(assets, device):
    from hago.measure import qemu
    from hago.hwspec import HardwareSpec

    missing = [t for t in ("aarch64-linux-gnu-g++", qemu.QEMU) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: tools/install_arm.sh")
    ok, why = qemu.is_available()
    if not ok:
        pytest.skip(why)
    out = _compile(assets, device)
    cpu = HardwareSpec.load(device).target["mcpu"]
    x = assets[2]
    logits = np.concatenate([qemu.run_under_qemu(out / "model.so", [x[i:i + 1]], cpu=cpu, timeout=300)[0]
                             for i in range(len(x))])
    _check(device, {"strategy": _strategy(out), **_logits_record(logits)})


def test_cuda_source_is_unchanged(assets):
    out = _compile(assets, "cuda-t4")
    source = (out / "kernels.cu").read_bytes()
    _check("cuda-t4", {"strategy": _strategy(out), "kernels_cu_sha256": hashlib.sha256(source).hexdigest(),
                       "kernels_cu_bytes": len(source)})
