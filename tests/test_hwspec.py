"""Hardware specs: the shipped YAML loads, and every malformed spec gets one precise line."""

from pathlib import Path

import pydantic
import pytest

from hago.errors import SpecError
from hago.hwspec import (HardwareSpec, OpDescriptor, check_spec_file, device_table,
                         list_devices, spec_dir)

DEVICES = {"x86-avx512-vnni", "x86-avx512-bf16", "x86-amx", "x86-avx2", "rpi4", "rpi5", "cuda-t4", "cuda-h100",
           "example-sparq-accel"}
BASE = (spec_dir() / "x86-avx512-vnni.yaml").read_text()
#: the x86-avx512-vnni spec's channel-scale entry (the malformed cases rewrite it)
MULTIPLY = ("  multiply:            # x * g, g a float [N, C, 1, 1] gate (squeeze-excitation): on x's codes, in one pass\n"
            "    - {inputs: [uint8], output: uint8}\n")
RELU = "  relu:\n    - {inputs: [uint8], output: uint8}\n"


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of ``needle``: keeps tests independent of
    comment edits in the shipped file."""
    return text[:text.index(needle)].count("\n") + 1


def _rejects(tmp_path: Path, text: str, stem: str = "x86-avx512-vnni") -> str:
    path = tmp_path / f"{stem}.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        HardwareSpec.load(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert len(msg) < 300, msg
    return msg


# -- shipped specs ----------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(spec_dir().glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spec_loads(path):
    spec = HardwareSpec.load(path)
    assert spec.name == path.stem
    assert spec.ops.get("default", "float32") == "float32"
    assert spec.integer_ops(), "every device runs something in integer"
    assert check_spec_file(path).startswith(f"{path}: OK")
    assert (spec.rpc is not None) == (spec.execution == "remote")


def test_list_devices_has_every_spec():
    specs = list_devices()
    assert {s.name for s in specs} == DEVICES
    assert [s.name for s in specs] == sorted(s.name for s in specs)
    table = device_table(specs)
    assert table.row_count == len(DEVICES)


def test_load_by_name_and_path_agree():
    by_name = HardwareSpec.load("rpi4")
    assert by_name == HardwareSpec.load(spec_dir() / "rpi4.yaml")
    assert by_name == HardwareSpec.load(str(spec_dir() / "rpi4.yaml"))
    assert by_name.cross_compiler == "aarch64-linux-gnu-g++"
    assert by_name.rpc.key == "rpi4" and by_name.rpc.tracker is None


def test_unknown_device_lists_valid_names():
    with pytest.raises(SpecError) as info:
        HardwareSpec.load("nonexistent-device")
    msg = str(info.value)
    assert "nonexistent-device" in msg and "\n" not in msg
    for name in DEVICES:
        assert name in msg


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        HardwareSpec.load(tmp_path / "nope.yaml")


def test_spec_dir_env_override(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text(BASE.replace("name: x86-avx512-vnni", "name: mine"))
    monkeypatch.setenv("HAGO_SPEC_DIR", str(tmp_path))
    assert spec_dir() == tmp_path
    assert [s.name for s in list_devices()] == ["mine"]
    assert HardwareSpec.load("mine").name == "mine"


# -- queries ---------------------------------------------------------------------
def test_x86_descriptors_and_integer_ops():
    spec = HardwareSpec.load("x86-avx512-vnni")
    (conv,) = spec.descriptors("conv2d")
    assert conv == OpDescriptor(inputs=["uint8", "int8"], accum="int32", output="int32",
                                layout="NCHW16c", weight_layout="OIHW4i16o4i")
    assert spec.descriptors("dense")[0].weight_layout == "NK16n4k"
    assert spec.descriptors("multiply")[0].inputs == ["uint8"]  # a squeeze-excitation's channel scale
    assert HardwareSpec.load("rpi4").descriptors("multiply") == []  # unlisted: float
    assert spec.descriptors("default") == []
    assert spec.descriptors("softmax") == []           # unknown op name: float, no error
    ops = spec.integer_ops()
    assert ops[:3] == ["conv2d", "depthwise_conv2d", "dense"]
    assert "default" not in ops and "softmax" not in ops
    assert spec.activation_dtype("conv2d") == "uint8"
    assert spec.activation_dtype("softmax") is None
    assert spec.bits.weight == [4, 8] and spec.weights.granularity == "per_channel"
    assert spec.activations.symmetric is False and spec.requantize == "fixed_point"


def test_device_facts():
    avx2 = HardwareSpec.load("x86-avx2")
    assert avx2.weights.range_bits == 7 and avx2.descriptors("dense")[0].weight_layout is None
    assert HardwareSpec.load("rpi5").descriptors("dense")[0].weight_layout == "NK4n4k"
    assert HardwareSpec.load("rpi4").activation_dtype("conv2d") == "int8"
    t4, h100 = HardwareSpec.load("cuda-t4"), HardwareSpec.load("cuda-h100")
    assert t4.bits.activation == [4, 8] and h100.bits.weight == [8]
    assert t4.activations.symmetric and t4.host["kind"] == "llvm"
    assert {d.inputs[0] for d in t4.descriptors("conv2d")} == {"int8", "int4"}


def test_frozen_and_bits_sorted():
    spec = HardwareSpec.from_yaml(BASE.replace("weight: [4, 8]", "weight: [8, 4]"))
    assert spec.bits.weight == [4, 8]
    with pytest.raises(pydantic.ValidationError):
        spec.name = "other"


# -- malformed specs ------------------------------------------------------------
# (id, old, new, key expected in the message, text whose line the message must name)
MALFORMED = [
    ("unknown-top-key", "requantize:", "frobnicate: 1\nrequantize:", "frobnicate", "frobnicate"),
    ("unknown-op", "  default:", "  matmul: float32\n  default:", "ops.matmul", "  matmul:"),
    ("bad-dtype", "inputs: [uint8, int8], accum: int32, output: int32, layout: NCHW16c",
     "inputs: [uint8, int7], accum: int32, output: int32, layout: NCHW16c",
     "ops.conv2d[0].inputs[1]", "int7"),
    ("float-input", RELU, RELU.replace("[uint8]", "[float32]"), "ops.relu[0].inputs[0]",
     "[float32]"),
    ("bits-not-4-or-8", "weight: [4, 8]", "weight: [4, 16]", "bits.weight[1]", "[4, 16]"),
    ("empty-bits", "activation: [8]", "activation: []", "bits.activation", "activation: []"),
    ("duplicate-bits", "weight: [4, 8]", "weight: [8, 8]", "bits.weight", "[8, 8]"),
    ("missing-output", RELU, RELU.replace(", output: uint8", ""), "ops.relu[0].output",
     "[uint8]}"),
    ("target-not-dict", "target: {kind: llvm, mcpu: cascadelake, num-cores: 2}",
     "target: llvm -mcpu=cascadelake", "target", "target:"),
    ("target-kind-missing", "{kind: llvm, mcpu: cascadelake,", "{mcpu: cascadelake,",
     "target.kind", "target:"),
    ("target-kind-bad", "kind: llvm, mcpu: cascadelake,", "kind: opencl, mcpu: cascadelake,",
     "target.kind", "target:"),
    ("host-not-llvm", "host: null", "host: {kind: cuda, arch: sm_75}", "host.kind", "host:"),
    ("bad-tracker", "execution: local\nrpc: null",
     "execution: remote\nrpc: {key: box, tracker: nohost}", "rpc.tracker", "rpc:"),
    ("bad-tracker-port", "execution: local\nrpc: null",
     "execution: remote\nrpc: {key: box, tracker: 'h:99999'}", "rpc.tracker", "rpc:"),
    ("remote-without-rpc", "execution: local", "execution: remote", "rpc", "rpc: null"),
    ("rpc-unknown-key", "execution: local\nrpc: null",
     "execution: remote\nrpc: {key: box, port: 9190}", "rpc.port", "rpc:"),
    ("default-not-float32", "  default: float32", "  default: int8", "ops.default", "default:"),
    ("op-bad-string", MULTIPLY, "  multiply: int8\n", "ops.multiply", "multiply"),
    ("op-empty-list", MULTIPLY, "  multiply: []\n", "ops.multiply", "multiply"),
    ("descriptor-unknown-key", RELU, RELU.replace("}", ", lanes: 4}"), "ops.relu[0].lanes",
     "lanes"),
    ("granularity-misspelled", "granularity: per_channel", "granularity: per_chanel",
     "weights.granularity", "per_chanel"),
    ("symmetric-not-bool", "symmetric: true}", "symmetric: maybe}", "weights.symmetric",
     "maybe"),
    ("range-bits-too-wide", "symmetric: true}", "symmetric: true, range_bits: 9}",
     "weights.range_bits", "range_bits"),
    ("dynamic-on-weights", "symmetric: true}", "symmetric: true, dynamic: [dense]}",
     "weights.dynamic", "dynamic"),
    ("dynamic-unknown-op", "dynamic: [dense]", "dynamic: [conv2d]", "activations.dynamic[0]",
     "dynamic: [conv2d]"),
    ("requantize-bad", "requantize: fixed_point", "requantize: shift", "requantize", "shift"),
    ("intrinsics-not-list", "intrinsics: [x86-vnni]", "intrinsics: x86-vnni", "intrinsics",
     "intrinsics:"),
    ("name-mismatch", "name: x86-avx512-vnni", "name: other-device", "name", "other-device"),
    ("duplicate-key", "requantize: fixed_point", "requantize: fixed_point\nrequantize: float",
     "requantize", "requantize: float"),
]


@pytest.mark.parametrize("old,new,key,line_text", [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_spec_names_file_line_key(tmp_path, old, new, key, line_text):
    assert old in BASE, old
    text = BASE.replace(old, new, 1)
    msg = _rejects(tmp_path, text)
    assert f":{_line_of(text, line_text)}: {key}: " in msg, msg


def test_missing_required_field_has_no_line(tmp_path):
    msg = _rejects(tmp_path, BASE.replace("requantize: fixed_point\n", ""))
    assert msg == f"{tmp_path / 'x86-avx512-vnni.yaml'}: requantize: required key missing"


def test_unknown_key_names_valid_keys(tmp_path):
    msg = _rejects(tmp_path, BASE.replace(RELU, RELU.replace("}", ", lanes: 4}")))
    assert "valid: inputs, accum, output, layout, weight_layout" in msg


def test_unknown_op_names_valid_ops(tmp_path):
    msg = _rejects(tmp_path, BASE.replace("  default:", "  matmul: float32\n  default:"))
    assert "dense" in msg and "conv2d" in msg


@pytest.mark.parametrize("text,line,problem", [
    ("name: a\nintrinsics: [x86-vnni\nops: {}\n", 3, "YAML syntax error"),
    ("name: a\n  bad: indent\n", 2, "YAML syntax error"),
    ("- name: a\n- name: b\n", 1, "must be a mapping"),
    ("just a string\n", 1, "must be a mapping"),
    ("", None, "empty file"),
])
def test_not_a_spec_mapping(tmp_path, text, line, problem):
    msg = _rejects(tmp_path, text, stem="a")
    where = f"a.yaml:{line}: " if line else "a.yaml: "
    assert where in msg and problem in msg, msg


def test_from_yaml_without_file():
    with pytest.raises(SpecError, match=r"^<string>:\d+: bits.weight\[0\]: "):
        HardwareSpec.from_yaml(BASE.replace("weight: [4, 8]", "weight: [2, 8]"))


# -- TVM accepts the target dicts ---------------------------------------------------
def test_targets_accepted_by_tvm():
    tvm = pytest.importorskip("tvm")
    from tvm.target import Target

    has = tvm.get_global_func("target.target_has_feature")
    targets = {}
    for spec in list_devices():
        t = Target(spec.target, host=spec.host) if spec.host else Target(spec.target)
        assert str(t.kind) == spec.target["kind"]
        targets[spec.name] = t
    assert has("avx512vnni", targets["x86-avx512-vnni"])
    assert not has("avx512vnni", targets["x86-avx2"]) and has("avx2", targets["x86-avx2"])
    assert has("dotprod", targets["rpi5"]) and not has("dotprod", targets["rpi4"])
    assert has("neon", targets["rpi4"])
    assert targets["cuda-t4"].attrs["arch"] == "sm_75"
    assert targets["cuda-h100"].attrs["arch"] == "sm_90"
    assert str(targets["cuda-t4"].host.kind) == "llvm"
