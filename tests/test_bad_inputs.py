"""Hostile and broken inputs: every one ends in exit code 2 and one ``hago: error:`` line, never a traceback.

Each case runs the real command line (``hago.cli.main`` in this process) and
reads stderr at the file-descriptor level (``capfd``), so noise printed by
TVM's or LLVM's C++ code would count as extra lines too. Most cases are
refused before TVM is imported or any model is built, which keeps the table
fast. The good model is the tiny conv -> relu -> dense net of test_cli.py
with relu instead of tanh: tanh falls back to float and annotate logs a
warning line for it, which would be a second line on stderr here.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from hago.cli import main

pytestmark = pytest.mark.llvm

DEV = "x86-avx512-vnni"


class _Planted:
    """Unpickling this runs ``touch MARKER``: proof of whether a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A folder of good and bad files; ``w / name`` is a path, ``W.model`` the good model."""
    import onnx
    import torch
    from torch import nn

    d = tmp_path_factory.mktemp("bad_inputs")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    good = d / "tiny.onnx"
    torch.onnx.export(Tiny().eval(), (torch.zeros(1, 1, 6, 6),), str(good), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, dynamo=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 6, 6)).astype(np.float32)
    y = np.arange(40) % 5
    np.savez(d / "calib.npz", x=x)
    np.savez(d / "eval.npz", x=x, label=y)

    # model files
    blob = good.read_bytes()
    (d / "empty.onnx").write_bytes(b"")
    (d / "truncated.onnx").write_bytes(blob[: len(blob) // 2])
    (d / "text.onnx").write_text("this is not a model, it is a note\n")
    (d / "model.txt").write_bytes(blob)
    (d / "folder.onnx").mkdir()
    onnx.save_model(onnx.load(str(good)), str(d / "external.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="external.data", size_threshold=0)
    (d / "external.data").unlink()
    (d / "pickle.onnx").write_bytes(pickle.dumps(_Planted(d / "PWNED_onnx")))
    (d / "model.pt").write_bytes(pickle.dumps(_Planted(d / "PWNED_pt")))
    from onnx import TensorProto, helper

    col2im = helper.make_graph(  # an op TVM's ONNX importer lacks
        [helper.make_node("Col2Im", ["x", "s", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("s", TensorProto.INT64, [2], [5, 5]), helper.make_tensor("b", TensorProto.INT64, [2], [2, 2])])
    onnx.save(helper.make_model(col2im, opset_imports=[helper.make_opsetid("", 18)]), d / "col2im.onnx")

    # data files
    nan, inf = x.copy(), x.copy()
    nan[3, 0, 2, 2] = np.nan
    inf[5, 0, 1, 1] = -np.inf
    np.savez(d / "shape.npz", x=x[:, :, :5, :])
    np.savez(d / "strings.npz", x=np.full((4, 1, 6, 6), "pixel"))
    np.savez(d / "nan.npz", x=nan)
    np.savez(d / "inf.npz", x=inf)
    np.savez(d / "empty.npz", x=x[:0])
    np.savez(d / "nokey.npz", y=x)
    np.savez(d / "object.npz", x=np.array([_Planted(d / "PWNED_npz")] * 2, dtype=object))
    np.save(d / "single.npy", x)
    (d / "text.npz").write_text("x = [1, 2, 3]\n")
    for name, label in {"oor": y + 3, "negative": np.where(y == 3, -1, y), "nanlabel": np.where(y == 2, np.nan, y),
                        "fraction": np.where(y == 2, 1.5, y), "short": y[:39], "onehot": np.ones((40, 5)),
                        "strlabel": np.array([f"class{v}" for v in y]), "cube": np.zeros((40, 5, 2))}.items():
        np.savez(d / f"eval_{name}.npz", x=x, label=label)

    # specs
    from hago.hwspec import spec_dir

    vnni = (spec_dir() / f"{DEV}.yaml").read_text()
    for sub, text in {"syntax": vnni.replace("bits:", "bits: [oops", 1), "unknown": vnni + "turbo: true\n",
                      "cores": vnni.replace("num-cores: 2", "num-cores: two"),
                      "mcpu": vnni.replace("mcpu: cascadelake", "mcpu: notacpu"), "empty": ""}.items():
        (d / sub).mkdir()
        (d / sub / f"{DEV}.yaml").write_text(text)
    (d / "renamed.yaml").write_text(vnni + "turbo: true\n")  # name != file name AND an unknown key

    # strategies
    other = {"schema": 1, "graph_hash": "0123456789abcdef", "device": DEV, "ops": {}, "edges": {}}
    (d / "other_model.json").write_text(json.dumps(other))
    (d / "notjson.json").write_text('{"schema": 1, "ops": ')
    qp = {"scale": 0.03, "zero_point": 128, "dtype": "uint8", "qmin": 0, "qmax": 255, "axis": None}
    edge = {"bits": 99, "dtype": "uint8", "range": [-4.0, 3.0], "qparams": qp}
    (d / "bits99.json").write_text(json.dumps({**other, "edges": {"input:x": edge}}))
    neg = {**edge, "bits": 8, "qparams": {**qp, "scale": -0.5}}
    (d / "negscale.json").write_text(json.dumps({**other, "edges": {"input:x": neg}}))

    # outputs and search state
    (d / "afile").write_text("not a folder\n")
    (d / "torn.jsonl").write_text("[1, 2]\nnot json at all\n")
    return d


def _argv(case: str, d: Path) -> list[str]:
    """The command line of one case; ``{d}`` in a word is the fixture folder."""
    return [word.replace("{d}", str(d)) for word in case.split()]


GOOD = "compile {d}/tiny.onnx --device " + DEV + " --calib {d}/calib.npz --no-measure"
SEARCH = "search {d}/tiny.onnx --device " + DEV + " --calib {d}/calib.npz --eval {d}/eval.npz --max-trials 2"

# (id, command line, a piece of the one error line)
CASES = [
    # model files
    ("model-missing", "compile {d}/nope.onnx --device " + DEV + " --calib {d}/calib.npz", "does not exist"),
    ("model-empty", "compile {d}/empty.onnx --device " + DEV + " --calib {d}/calib.npz", "empty"),
    ("model-truncated", "compile {d}/truncated.onnx --device " + DEV + " --calib {d}/calib.npz", "not a valid ONNX"),
    ("model-text", "compile {d}/text.onnx --device " + DEV + " --calib {d}/calib.npz", "not a valid ONNX"),
    ("model-folder", "compile {d}/folder.onnx --device " + DEV + " --calib {d}/calib.npz", "not a file"),
    ("model-not-onnx", "compile {d}/model.txt --device " + DEV + " --calib {d}/calib.npz", "not an .onnx file"),
    ("model-external-data-missing", "compile {d}/external.onnx --device " + DEV + " --calib {d}/calib.npz",
     "external.data"),
    ("model-pickle-as-onnx", "compile {d}/pickle.onnx --device " + DEV + " --calib {d}/calib.npz",
     "not a valid ONNX"),
    ("model-pickle-as-pt", "compile {d}/model.pt --device " + DEV + " --calib {d}/calib.npz", "torch.onnx.export"),
    ("model-pt-search", "search {d}/model.pt --device " + DEV + " --calib {d}/calib.npz --eval {d}/eval.npz -o {d}/s",
     "export it to ONNX"),
    ("model-op-importer-lacks", "compile {d}/col2im.onnx --device " + DEV + " --calib {d}/calib.npz", "Col2Im"),
    # data files
    ("calib-missing-file", "compile {d}/tiny.onnx --device " + DEV + " --calib {d}/nope.npz", "does not exist"),
    ("calib-not-given", "compile {d}/tiny.onnx --device " + DEV, "--calib"),
    ("calib-wrong-shape", GOOD.replace("calib.npz", "shape.npz"), "shape (40, 1, 5, 6)"),
    ("calib-strings", GOOD.replace("calib.npz", "strings.npz"), "dtype <U5"),
    ("calib-nan", GOOD.replace("calib.npz", "nan.npz"), "NaN"),
    ("calib-inf", GOOD.replace("calib.npz", "inf.npz"), "(sample 5)"),
    ("calib-empty", GOOD.replace("calib.npz", "empty.npz"), "0 samples"),
    ("calib-no-input-key", GOOD.replace("calib.npz", "nokey.npz"), "no array for input 'x'"),
    ("calib-object-array", GOOD.replace("calib.npz", "object.npz"), "allow_pickle"),
    ("calib-npy-not-npz", GOOD.replace("calib.npz", "single.npy"), "single .npy array"),
    ("calib-text", GOOD.replace("calib.npz", "text.npz"), "not a .npz archive"),
    # labels
    ("eval-not-given-to-search", "search {d}/tiny.onnx --device " + DEV + " --calib {d}/calib.npz -o {d}/s",
     "--eval"),
    ("labels-out-of-range", GOOD + " --eval {d}/eval_oor.npz", "label 2 is 5, but the model has 5"),
    ("labels-negative", GOOD + " --eval {d}/eval_negative.npz", "label 3 is -1"),
    ("labels-nan", GOOD + " --eval {d}/eval_nanlabel.npz", "label 2 is nan"),
    ("labels-fraction", GOOD + " --eval {d}/eval_fraction.npz", "label 2 is 1.5"),
    ("labels-wrong-length", GOOD + " --eval {d}/eval_short.npz", "39 labels but 40 samples"),
    ("labels-bad-one-hot", GOOD + " --eval {d}/eval_onehot.npz", "row 0 is not one-hot"),
    ("labels-strings", GOOD + " --eval {d}/eval_strlabel.npz", "labels have dtype <U"),
    ("labels-3d", GOOD + " --eval {d}/eval_cube.npz", "labels have shape (40, 5, 2)"),
    ("labels-search", SEARCH.replace("eval.npz", "eval_negative.npz") + " -o {d}/s", "label 3 is -1"),
    # devices and specs
    ("device-unknown", GOOD.replace(DEV, "tpu-v9"), "unknown device 'tpu-v9'"),
    ("spec-yaml-syntax", "spec check {d}/syntax/" + DEV + ".yaml", "YAML syntax error"),
    ("spec-unknown-key", "spec check {d}/unknown/" + DEV + ".yaml", "turbo: unknown key"),
    ("spec-wrong-type", "spec check {d}/cores/" + DEV + ".yaml", "num-cores: must be a positive integer"),
    ("spec-unknown-mcpu", "spec check {d}/mcpu/" + DEV + ".yaml", "does not know CPU 'notacpu'"),
    ("spec-unknown-mcpu-compile", GOOD.replace(DEV, "{d}/mcpu/" + DEV + ".yaml"), "does not know CPU 'notacpu'"),
    ("spec-empty", "spec check {d}/empty/" + DEV + ".yaml", "got an empty file"),
    ("spec-real-fault-first", "spec check {d}/renamed.yaml", "turbo: unknown key"),
    ("spec-file-missing", GOOD.replace(DEV, "{d}/nope.yaml"), "cannot read spec file"),
    # options
    ("accuracy-drop-garbage", SEARCH + " -o {d}/s --accuracy-drop lots", "accuracy drop 'lots'"),
    ("accuracy-drop-negative", SEARCH + " -o {d}/s --accuracy-drop=-1%", "accuracy drop '-1%'"),
    ("accuracy-drop-200%", SEARCH + " -o {d}/s --accuracy-drop 200%", "out of range"),
    ("max-trials-zero", SEARCH + " -o {d}/s --max-trials 0", "--max-trials must be at least 1"),
    ("max-trials-text", SEARCH + " -o {d}/s --max-trials many", "invalid int value: 'many'"),
    ("tune-trials-negative", GOOD + " --tune-trials -3", "--tune-trials must be at least 0"),
    ("batch-zero", GOOD + " --batch 0", "--batch must be at least 1"),
    ("precision-unknown", GOOD + " --precision fp16", "--precision 'fp16': valid: int8, bf16"),
    ("precision-bf16-on-cascadelake", GOOD + " --precision bf16",
     "--precision bf16: x86-avx512-vnni declares no bf16 (it has: int4, int8, fp32)"),
    ("embedding-bits-8", GOOD + " --embedding-bits 8", "--embedding-bits 8: valid: 4"),
    ("embedding-bits-on-avx2", GOOD.replace(DEV, "x86-avx2") + " --embedding-bits 4",
     "--embedding-bits 4: x86-avx2 stores no 4-bit row-wise tables"),
    ("bench-bf16-on-cascadelake", SEARCH.replace("search", "bench", 1).replace(" --max-trials 2", "")
     + " --strategies fp32,bf16", "--strategies bf16: x86-avx512-vnni declares no bf16"),
    ("time-budget-negative", SEARCH + " -o {d}/s --time-budget=-5", "--time-budget"),
    ("measure-timeout-zero", GOOD + " --measure-timeout 0", "--measure-timeout"),
    ("calibrator-unknown", GOOD + " --calibrator bogus", "unknown calibrator 'bogus'"),
    ("corrections-unknown", GOOD + " --corrections bogus", "unknown correction 'bogus'"),
    ("bench-strategies-unknown", SEARCH.replace("search", "bench", 1) + " --strategies fp32,int9", "int9"),
    ("rpc-without-key", GOOD + " --rpc 127.0.0.1:9190", "--key"),
    ("rpc-not-host-port", GOOD + " --rpc localhost --key rpi4", "host:port"),
    ("command-unknown", "frobnicate", "invalid choice"),
    ("argument-missing", "compile", "required: model, --device"),
    # strategies
    ("strategy-other-model", "compile {d}/tiny.onnx --device " + DEV + " --strategy {d}/other_model.json --no-measure",
     "strategy is for graph 0123456789abcdef"),
    ("strategy-not-json", "compile {d}/tiny.onnx --device " + DEV + " --strategy {d}/notjson.json", "not valid JSON"),
    ("strategy-bits-99", "compile {d}/tiny.onnx --device " + DEV + " --strategy {d}/bits99.json",
     "edges['input:x'].bits: must be 0 (float) or a bit width"),
    ("strategy-negative-scale", "compile {d}/tiny.onnx --device " + DEV + " --strategy {d}/negscale.json",
     "qparams.scale: must be finite and positive"),
    ("strategy-missing", "compile {d}/tiny.onnx --device " + DEV + " --strategy {d}/nope.json", "does not exist"),
    # outputs
    ("output-is-a-file", GOOD + " -o {d}/afile", "existing file"),
    ("output-under-a-file", GOOD + " -o {d}/afile/build", "Not a directory"),
    ("output-unwritable", GOOD + " -o /proc/hago-bad-inputs/build", "cannot write to output folder"),
    ("search-output-unwritable", SEARCH + " -o /proc/hago-bad-inputs/build", "cannot write to output folder"),
    # search state and remote devices
    ("search-log-corrupted", SEARCH + " --resume {d}/torn.jsonl", "torn.jsonl"),
    ("search-log-missing", SEARCH + " --resume {d}/nolog.jsonl", "no such log"),
    ("rpc-tracker-unreachable", "search {d}/tiny.onnx --device rpi4 --calib {d}/calib.npz --eval {d}/eval.npz "
     "--max-trials 2 -o {d}/rpc --rpc 127.0.0.1:9 --key rpi4", "127.0.0.1:9"),
]

#: seconds a case may take; the rest are refused before any build and take far less
TIME_LIMIT = {"rpc-tracker-unreachable": 10.0}


def _param(c):
    return pytest.param(*c.values, id=c.values[0], marks=c.marks) if hasattr(c, "values") else pytest.param(*c, id=c[0])


def _plain(c):
    return tuple(c.values) if hasattr(c, "values") else c


@pytest.mark.parametrize("cid,case,expect", [_param(c) for c in CASES])
def test_one_clean_line(w, capfd, cid, case, expect):
    capfd.readouterr()
    t0 = time.monotonic()
    code = main(_argv(case, w))
    seconds = time.monotonic() - t0
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("hago: error: "), err[-2000:]
    assert "Traceback" not in out + err
    assert expect in lines[0], lines[0]
    assert not (w / "s").exists(), "a refused search left its output folder behind"
    assert seconds < TIME_LIMIT.get(cid, 120.0), f"{cid} took {seconds:.1f}s"


def test_table_is_large_enough():
    assert len(CASES) >= 40 and len({_plain(c)[0] for c in CASES}) == len(CASES)


def test_nothing_was_unpickled(w, capfd):
    """The planted pickles (as .onnx, as .pt, inside an .npz) are refused without running."""
    for case in ("compile {d}/pickle.onnx --device " + DEV + " --calib {d}/calib.npz",
                 "compile {d}/model.pt --device " + DEV + " --calib {d}/calib.npz",
                 GOOD.replace("calib.npz", "object.npz")):
        assert main(_argv(case, w)) == 2
    capfd.readouterr()
    assert not list(w.glob("PWNED*"))


def test_internal_errors_are_one_line_too(capfd, monkeypatch):
    """A bug (not a user error) still ends in one line, exit 2, and a pointer to --debug; Ctrl-C stays Ctrl-C."""
    import hago.cli as cli

    def boom(args):
        raise RuntimeError("no such thing\nsecond line")

    monkeypatch.setattr(cli, "_cmd_devices", boom)
    assert main(["devices"]) == 2
    err = capfd.readouterr().err.strip()
    assert err == "hago: error: internal error: RuntimeError: no such thing (re-run with --debug for the traceback)"
    with pytest.raises(RuntimeError):
        main(["--debug", "devices"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_devices", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["devices"])


def test_help_imports_neither_tvm_nor_torch():
    """``hago --help`` and a refused model path answer without the seconds TVM and torch take to import."""
    import subprocess
    import sys

    for argv in (["--help"], ["compile", "/nonexistent/m.onnx", "--device", DEV, "--calib", "c.npz"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "hago", *argv], capture_output=True,
                           text=True, timeout=120)
        heavy = [ln for ln in r.stderr.splitlines() if ln.rstrip().endswith((" tvm", " torch"))]
        assert heavy == [], heavy


@pytest.mark.parametrize("cid", ["model-missing", "strategy-other-model"])
def test_a_real_process_prints_one_line(w, cid):
    """In a real process log records reach stderr too (pytest captures them in-process): still one line."""
    import subprocess
    import sys

    case, expect = next(_plain(c)[1:] for c in CASES if _plain(c)[0] == cid)
    r = subprocess.run([sys.executable, "-m", "hago", *_argv(case, w)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hago: error: ") and expect in lines[0], r.stderr[-2000:]


# -- what must still be accepted --------------------------------------------------
def test_labels_accepted_as_class_indices():
    """Whole-number floats are cast, one-hot rows and a column of indices become indices; range needs the model."""
    from hago.data import InputInfo, check_labels, load_samples
    from hago.errors import DataError

    x = np.zeros((4, 2), np.float32)
    infos = [InputInfo("x", (None, 2), "float32")]
    for labels in (np.array([0.0, 1.0, 2.0, 3.0]), np.eye(4, dtype=np.float32), np.arange(4).reshape(4, 1)):
        got = load_samples({"x": x, "label": labels}, infos, name="evaluation").labels
        assert got.dtype == np.int64 and got.tolist() == [0, 1, 2, 3]
    assert check_labels(np.array([0, 1, 2, 3]), 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="label 3 is 3, but the model has 3 output classes"):
        check_labels(np.array([0, 1, 2, 3]), 3)


def test_raw_pixels_for_a_float_model_warn_once(caplog):
    """0..255 integers for a float input are used (some models take them) but noted, for the report."""
    from hago.data import InputInfo, load_samples

    infos = [InputInfo("x", (None, 2), "float32")]
    with caplog.at_level("WARNING", logger="hago.data"):
        s = load_samples({"x": np.array([[0, 255], [17, 3]], np.int64)}, infos)
    assert s.arrays["x"].dtype == np.float32 and s.arrays["x"].max() == 255
    assert len(s.notes) == 1 and "unnormalised" in s.notes[0] and "up to 255" in s.notes[0]
    assert [r.getMessage() for r in caplog.records] == s.notes
    assert load_samples({"x": np.array([[0, 1], [1, 0]], np.uint8)}, infos).notes == []
    assert load_samples({"x": np.array([[0.5, 200.0]], np.float32)}, infos).notes == []


def test_every_bundled_spec_passes_the_llvm_check(capfd):
    from hago.hwspec import spec_dir

    files = sorted(str(p) for p in spec_dir().glob("*.yaml"))
    assert main(["spec", "check", *files]) == 0
    out, err = capfd.readouterr()
    assert out.count(": OK (") == len(files) and err == ""


def test_a_saved_strategy_still_loads(tmp_path):
    """The validation refuses only what realize cannot use: a real strategy round-trips."""
    from hago.strategy import EdgeChoice, OpChoice, Strategy
    from hago.qparams import activation_qparams

    s = Strategy("0123456789abcdef", DEV, "mse", corrections=["bias"])
    s.ops["n0_conv2d"] = OpChoice("conv2d", "integer", {"inputs": ["uint8", "int8"], "accum": "int32",
                                                        "output": "int32", "weight_layout": "OIHW4i16o4i"},
                                  weight_bits=7, bias_delta=[0.5, -0.25])
    s.ops["n1_other"] = OpChoice("other", "float", reason="unsupported op")
    s.edges["input:x"] = EdgeChoice(8, "uint8", False, (-1.0, 2.0), activation_qparams(-1.0, 2.0, "uint8", 8, False))
    s.edges["n0_conv2d"] = EdgeChoice(8, None, alias_of="input:x")
    s.edges["n1_other"] = EdgeChoice(8, "uint8", dynamic=True)
    s.save(tmp_path / "s.json")
    back = Strategy.load(tmp_path / "s.json")
    assert back.to_json() == s.to_json()
