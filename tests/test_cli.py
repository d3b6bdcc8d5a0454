"""The command line: listings, spec check and a compile.

The table of bad inputs (an op TVM's importer lacks included) (one line, exit 2, no traceback) is tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from hago.cli import main

pytestmark = pytest.mark.llvm


class _Tiny(nn.Module):
    """conv -> tanh -> dense: tanh has no integer form anywhere, so it must fall back to float."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = _Tiny().eval()
    path = d / "tiny.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 6, 6),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, dynamo=False)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((40, 1, 6, 6)).astype(np.float32)
    np.savez(d / "calib.npz", x=calib)
    return d, path, calib


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hago: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_devices_lists_every_spec(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for name in ("x86-avx512-vnni", "x86-avx512-bf16", "x86-amx", "x86-avx2", "rpi4", "rpi5", "cuda-t4", "cuda-h100"):
        assert name in out


def test_devices_show_each_specs_precisions():
    from hago.hwspec import device_table, list_devices

    table = device_table(list_devices())
    header = [c.header for c in table.columns]
    names, precisions = (list(table.columns[header.index(h)]._cells) for h in ("name", "precisions"))
    row = dict(zip(names, precisions))
    assert row["x86-avx512-bf16"] == "int4 int8 bf16 fp32"
    assert row["x86-avx512-vnni"] == "int4 int8 fp32"  # Cascade Lake: no bf16
    assert row["rpi4"] == "int4 int8 fp32"  # 4-bit weights packed in the sdot/smull kernels
    assert row["x86-avx2"] == "int8 fp32"


def test_spec_check(capsys, tmp_path):
    from hago.hwspec import spec_dir

    assert main(["spec", "check", str(spec_dir() / "rpi5.yaml")]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text((spec_dir() / "rpi5.yaml").read_text().replace("name: rpi5", "name: bad\nturbo: true"))
    err = _err(capsys, ["spec", "check", str(bad)])
    assert "bad.yaml" in err and "turbo" in err


def test_compile_reports_float_fallback(capsys, tiny):
    d, path, _ = tiny
    out = d / "build"
    assert main(["compile", str(path), "--device", "x86-avx512-vnni", "--calib", str(d / "calib.npz"),
                 "-o", str(out), "--no-measure"]) == 0
    text = capsys.readouterr().out
    assert "relax.tanh" in text and "float" in text
    report = json.loads((out / "report.json").read_text())
    # conv and dense run in integer; tanh cannot, and the flatten after it has float input
    assert report["ops"] == {"integer": 2, "bf16": 0, "float": 2}
    reasons = {op["kind"]: op["reason"] for op in report["float_ops"]}
    assert "unsupported op relax.tanh" in reasons["other"]
    assert "inputs are float" in reasons["reshape"]
