"""ARM (Raspberry Pi 4/5): cross-compiled builds, run under qemu-aarch64, against the host.

Needs the aarch64 toolchain, qemu-user and the aarch64 runtime + driver, all
installed by ``tools/install_arm.sh`` (``make install``). Tests skip only when
the toolchain or qemu is absent; a missing runtime/driver is a failure that
names the install command.

qemu runs the real code, so outputs must be bit-identical to the host build of
the same realized module (integer arithmetic is exact); its timings mean nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from hago import zoo
from hago.measure import qemu
from hago.errors import MeasureError
from hago.hwspec import HardwareSpec

CROSS_CXX = "aarch64-linux-gnu-g++"
OBJDUMP = "aarch64-linux-gnu-objdump"
N_IMAGES = 500  # qemu is slow: 500 real test images, two batches
BATCH = 250
N_CALIB = 256
EM_AARCH64 = 183
# the int8 multiply-accumulate each board's tensorized kernels must use
EXPECTED_ASM = {"rpi4": ("smull", "smlal", "sadalp", "saddlp"), "rpi5": ("sdot",)}

_missing = [t for t in (CROSS_CXX, qemu.QEMU) if shutil.which(t) is None]
needs_arm = pytest.mark.skipif(bool(_missing), reason=f"{' and '.join(_missing)} not installed: tools/install_arm.sh")


# --------------------------------------------------------------------------- pure numpy / no qemu

def test_tensor_file_roundtrip(tmp_path):
    arrays = [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.array([-128, 0, 127], np.int8),
              np.array([[True, False]]), np.zeros((0, 5), np.int64), np.float16(1.5).reshape(())]
    qemu.save_tensors(tmp_path / "t.hgt", arrays)
    back = qemu.load_tensors(tmp_path / "t.hgt")
    assert len(back) == len(arrays)
    for a, b in zip(arrays, back):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_missing_runtime_is_one_line_error_naming_install(tmp_path, monkeypatch):
    monkeypatch.setenv("HAGO_ARM_SYSROOT", str(tmp_path / "nowhere"))
    ok, why = qemu.is_available()
    assert not ok and "install_arm.sh" in why and "libtvm_runtime.so" in why
    with pytest.raises(MeasureError, match="make install") as err:
        qemu.run_under_qemu(tmp_path / "model.so", [np.zeros(1, np.float32)])
    assert "\n" not in str(err.value)


def test_apply_arm_schedules_leaves_non_arm_specs_alone():
    from hago.backends.arm.schedule import apply_arm_schedules

    mod, _ = _int8_layers_module()
    assert apply_arm_schedules(mod, HardwareSpec.load("x86-avx512-vnni")).same_as(mod)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def calib():
    return zoo.mnist_data("train")[0][:N_CALIB]


@pytest.fixture(scope="module", params=["rpi4", "rpi5"])
def arm(request, tmp_path_factory, calib, mnist_model, cpu_target):
    """One ``hago.compile`` per Pi: the result, its out dir, and the host reference on N_IMAGES.

    The reference is the host build of ``result.realized.mod`` (symbolic batch),
    so the check also covers the static-batch re-realize that model.so goes through.
    """
    if _missing:
        pytest.skip(f"{' and '.join(_missing)} not installed: tools/install_arm.sh")
    import torch

    from hago.compiler import compile as hago_compile

    device = request.param
    out = tmp_path_factory.mktemp(device)
    res = hago_compile(mnist_model, device, calib, example_inputs=(torch.zeros(1, 1, 28, 28),),
                       out_dir=out, calibrator="mse", batch=BATCH)  # model.so takes [BATCH, 1, 28, 28]
    x, y = zoo.mnist_data("test")
    x, y = x[:N_IMAGES], y[:N_IMAGES]
    host = relax.VirtualMachine(tvm.compile(res.realized.mod, target=cpu_target), tvm.cpu())
    ref = np.concatenate([host["main"](tvm.runtime.tensor(x[i:i + BATCH])).numpy() for i in range(0, len(x), BATCH)])
    spec = HardwareSpec.load(device)
    return {"device": device, "spec": spec, "result": res, "out": out, "x": x, "y": y, "ref": ref, "cache": {}}


def _tensorized_lib(arm) -> Path:
    """The realized module with :func:`apply_arm_schedules`, cross-built and exported (cached)."""
    if "lib" not in arm["cache"]:
        from tvm.support import cc

        from hago.backends.arm.schedule import apply_arm_schedules
        from hago.build import target_of

        mod = apply_arm_schedules(arm["result"].realized.mod, arm["spec"])
        ex = tvm.compile(mod, target=target_of(arm["spec"]))
        path = arm["out"] / "tensorized.so"
        ex.export_library(str(path), fcompile=cc.cross_compiler(CROSS_CXX))
        arm["cache"]["lib"] = path
    return arm["cache"]["lib"]


def _qemu_outputs(lib: Path, arm) -> np.ndarray:
    cpu = arm["spec"].target["mcpu"]  # emulate the board's core: a missing extension traps
    x = arm["x"]
    return np.concatenate([qemu.run_under_qemu(lib, [x[i:i + BATCH]], cpu=cpu, timeout=300)[0]
                           for i in range(0, len(x), BATCH)])


def _assert_bit_identical(out: np.ndarray, arm) -> None:
    ref = arm["ref"]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), \
        f"{int((out != ref).sum())} of {out.size} logits differ from the host build"
    acc, acc_ref = (out.argmax(1) == arm["y"]).mean(), (ref.argmax(1) == arm["y"]).mean()
    assert acc == acc_ref and acc > 0.97


# --------------------------------------------------------------------------- the Pi builds

@needs_arm
def test_compile_writes_aarch64_library_and_reports_no_latency(arm):
    lib = arm["out"] / "model.so"
    header = lib.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # ELF64
    assert int.from_bytes(header[18:20], "little") == EM_AARCH64
    report = arm["result"].report
    assert report["device"] == arm["device"] and report["quantized"]["latency_ms"] is None
    assert any("latency was not measured" in n for n in report["notes"])
    assert (arm["out"] / "report.json").is_file() and (arm["out"] / "strategy.json").is_file()


@needs_arm
def test_compiled_model_under_qemu_is_bit_identical_to_host(arm):
    _assert_bit_identical(_qemu_outputs(arm["out"] / "model.so", arm), arm)


@needs_arm
def test_tensorized_build_under_qemu_is_bit_identical_to_host(arm):
    _assert_bit_identical(_qemu_outputs(_tensorized_lib(arm), arm), arm)


def _asm_by_function(lib: Path) -> dict[str, str]:
    """``objdump -d`` of ``lib``, split into {symbol: its disassembly}."""
    asm = subprocess.run([OBJDUMP, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"^[0-9a-f]+ <([^>]+)>:$", asm, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@needs_arm
def test_every_tensorized_kernel_uses_int8_dot_instructions(arm):
    funcs = _asm_by_function(_tensorized_lib(arm))
    kernels = {name: body for name, body in funcs.items() if name.startswith("hago_arm_") and name.endswith("_compute_")}
    assert len(kernels) == 4, sorted(funcs)  # conv1, conv2, fc1, fc2 of the MNIST CNN: none fused away
    for name, body in kernels.items():
        counts = {op: len(re.findall(rf"\t{op}\b", body)) for op in EXPECTED_ASM[arm["device"]]}
        assert sum(counts.values()) > 0, f"{name}: no {'/'.join(EXPECTED_ASM[arm['device']])}"
    if arm["device"] == "rpi4":
        assert not any(re.search(r"\tsdot\b", body) for body in funcs.values()), \
            "the Cortex-A72 has no dot product: sdot would SIGILL on a Pi 4"


@needs_arm
def test_only_the_sdot_build_traps_on_cortex_a72(arm):
    """qemu -cpu is faithful: the Pi 5 build cannot run on a Pi 4 core, the Pi 4 build can."""
    if arm["device"] == "rpi5":
        with pytest.raises(MeasureError, match="signal 4"):
            qemu.run_under_qemu(_tensorized_lib(arm), [arm["x"][:1]], cpu="cortex-a72", timeout=120)
    else:
        out = qemu.run_under_qemu(_tensorized_lib(arm), [arm["x"][:1]], cpu="cortex-a72", timeout=120)
        assert out[0].shape == (1, 10)


# --------------------------------------------------------------------------- kernel edge cases

def _int8_layers_module() -> tuple[tvm.IRModule, tuple]:
    """conv (stride 2, pad 1, K=27, O=6) -> dense (N=10); a depthwise conv and a K=6 dense are declined.

    Returns the module and its weights (for the numpy reference).
    """
    rng = np.random.default_rng(0)
    w1 = rng.integers(-128, 128, (6, 3, 3, 3), dtype=np.int8)
    w2 = rng.integers(-128, 128, (3, 1, 3, 3), dtype=np.int8)
    wd = rng.integers(-128, 128, (96, 10), dtype=np.int8)
    wk = rng.integers(-128, 128, (6, 5), dtype=np.int8)
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 3, 7, 7), "int8"))
    d = relax.Var("d", relax.TensorType((2, 6), "int8"))
    with bb.function("main", [x, d]):
        with bb.dataflow():
            c1 = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), strides=2, padding=1, out_dtype="int32"))
            c2 = bb.emit(relax.op.nn.conv2d(x, relax.const(w2), groups=3, out_dtype="int32"))
            flat = bb.emit(relax.op.reshape(relax.op.astype(relax.op.clip(c1, -128, 127), "int8"),
                                            relax.ShapeExpr([n, 96])))
            m1 = bb.emit(relax.op.matmul(flat, relax.const(wd), out_dtype="int32"))
            m2 = bb.emit(relax.op.matmul(d, relax.const(wk), out_dtype="int32"))
            gv = bb.emit_output(relax.Tuple([c1, c2, m1, m2]))
        bb.emit_func_output(gv)
    return bb.get(), (w1, w2, wd, wk)


def _conv_reference(a, w, stride, pad, depthwise=False):
    """Integer NCHW conv in int64 numpy."""
    a = np.pad(a.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    w = w.astype(np.int64)
    o, _, r, s = w.shape
    oh, ow = (a.shape[2] - r) // stride + 1, (a.shape[3] - s) // stride + 1
    out = np.zeros((a.shape[0], o, oh, ow), np.int64)
    for i in range(r):
        for j in range(s):
            patch = a[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            out += patch * w[None, :, 0, i, j, None, None] if depthwise else \
                np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def _numpy_reference(x: np.ndarray, d: np.ndarray, weights) -> list[np.ndarray]:
    w1, w2, wd, wk = (w.astype(np.int64) for w in weights)
    c1 = _conv_reference(x, w1, 2, 1)
    flat = np.clip(c1, -128, 127).reshape(len(x), -1)
    return [c1, _conv_reference(x, w2, 1, 0, depthwise=True), flat @ wd, d.astype(np.int64) @ wk]


@needs_arm
@pytest.mark.parametrize("device", ["rpi4", "rpi5"])
def test_kernels_with_padding_strides_and_odd_sizes_match_numpy(device, tmp_path):
    from tvm.support import cc

    from hago.backends.arm.schedule import apply_arm_schedules
    from hago.build import target_of

    spec = HardwareSpec.load(device)
    mod, weights = _int8_layers_module()
    tensorized = apply_arm_schedules(mod, spec)
    kernels = sorted(gv.name_hint for gv in tensorized.get_global_vars() if gv.name_hint.startswith("hago_arm_"))
    assert [k.split("_")[2] for k in kernels] == ["conv2d", "dense"]  # depthwise and K=6 declined
    lib = tmp_path / "layers.so"
    tvm.compile(tensorized, target=target_of(spec)).export_library(str(lib), fcompile=cc.cross_compiler(CROSS_CXX))
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (3, 3, 7, 7), dtype=np.int8)
    d = rng.integers(-128, 128, (2, 6), dtype=np.int8)
    got = qemu.run_under_qemu(lib, [x, d], cpu=spec.target["mcpu"], timeout=120)
    want = _numpy_reference(x, d, weights)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert g.dtype == np.int32 and np.array_equal(g, w)


def _int4_layers_module() -> tuple[tvm.IRModule, tuple]:
    """4-bit weights (values in [-8, 7]): conv (stride 2, pad 1, K=27 -> 32, O=6) -> dense (K=96, N=10) packed two
    per byte; a K=12 dense (not a multiple of 8) keeps the int8 kernel."""
    rng = np.random.default_rng(4)
    w1 = rng.integers(-8, 8, (6, 3, 3, 3), dtype=np.int8)
    wd = rng.integers(-8, 8, (96, 10), dtype=np.int8)
    w12 = rng.integers(-8, 8, (12, 5), dtype=np.int8)
    w1[0, 0, 0, 0], wd[0, 0] = -8, 7  # both ends of the range
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 3, 7, 7), "int8"))
    d = relax.Var("d", relax.TensorType((2, 12), "int8"))
    with bb.function("main", [x, d]):
        with bb.dataflow():
            c1 = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), strides=2, padding=1, out_dtype="int32"))
            flat = bb.emit(relax.op.reshape(relax.op.astype(relax.op.clip(c1, -128, 127), "int8"),
                                            relax.ShapeExpr([n, 96])))
            m1 = bb.emit(relax.op.matmul(flat, relax.const(wd), out_dtype="int32"))
            m2 = bb.emit(relax.op.matmul(d, relax.const(w12), out_dtype="int32"))
            gv = bb.emit_output(relax.Tuple([c1, m1, m2]))
        bb.emit_func_output(gv)
    return bb.get(), (w1, wd, w12)


@needs_arm
@pytest.mark.parametrize("device", ["rpi4", "rpi5"])
def test_packed_4bit_kernels_match_numpy(device, tmp_path):
    """A 4-bit layer's weights are stored two per byte and unpacked inside the sdot/smull kernel, bit-exact."""
    from tvm.support import cc

    from hago.backends.arm.schedule import apply_arm_schedules
    from hago.build import target_of

    spec = HardwareSpec.load(device)
    mod, (w1, wd, w12) = _int4_layers_module()
    tensorized = apply_arm_schedules(mod, spec)
    kernels = sorted(gv.name_hint for gv in tensorized.get_global_vars() if gv.name_hint.startswith("hago_arm_"))
    assert [k.split("_")[2] for k in kernels] == ["conv2d", "dense", "dense"]
    assert [k.endswith("_int4") for k in kernels] == [True, False, True]  # the K=12 dense stays int8
    weights = {}
    for block in tensorized["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir":
                weights[v.args[0].name_hint] = v.args[1].fields[1].value.numpy()
    # half the bytes: 6x27 conv weights padded to 8x32 -> 128, 96x10 dense padded to 96x12 -> 576
    assert sorted((w.dtype.name, w.size) for k, w in weights.items() if k.endswith("_int4")) == [("uint8", 128),
                                                                                                ("uint8", 576)]
    lib = tmp_path / "int4.so"
    tvm.compile(tensorized, target=target_of(spec)).export_library(str(lib), fcompile=cc.cross_compiler(CROSS_CXX))
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (2, 3, 7, 7), dtype=np.int8)
    d = rng.integers(-128, 128, (2, 12), dtype=np.int8)
    got = qemu.run_under_qemu(lib, [x, d], cpu=spec.target["mcpu"], timeout=120)
    c1 = _conv_reference(x, w1, 2, 1)
    flat = np.clip(c1, -128, 127).reshape(len(x), -1)
    want = [c1, flat @ wd.astype(np.int64), d.astype(np.int64) @ w12.astype(np.int64)]
    for g, w in zip(got, want):
        assert g.dtype == np.int32 and np.array_equal(g, w)


@needs_arm
def test_4bit_build_runs_packed_under_qemu_bit_identical_to_host(calib, mnist_model, cpu_target, tmp_path):
    """W4A8 on the Pi 5: every weighted layer's weights ship two per byte, and the board computes what the host
    build of the same integer program computes (the Pi 4's NEON kernel: ``test_packed_4bit_kernels_match_numpy``)."""
    import torch

    from hago.annotate import AnnotateConfig
    from hago.backends.arm.schedule import apply_arm_schedules
    from hago.compiler import compile as hago_compile
    from hago.weight_bytes import weight_bytes

    spec = HardwareSpec.load("rpi5")
    res = hago_compile(mnist_model, spec, calib, example_inputs=(torch.zeros(1, 1, 28, 28),),
                       out_dir=tmp_path, calibrator="mse", batch=BATCH, corrections=(),
                       annotate_config=AnnotateConfig(weight_bits=4))
    assert {op.weight_bits for op in res.strategy.ops.values() if op.mode == "integer" and op.weight_bits} == {4}
    kernels = [gv.name_hint for gv in apply_arm_schedules(res.realized.mod, spec).get_global_vars()
               if gv.name_hint.startswith("hago_arm_")]
    assert kernels and all(k.endswith("_int4") for k in kernels), kernels
    # the report counts the weights as they ship: half the bytes of the same values in int8, plus padding
    assert res.report["quantized"]["weight_bytes"] <= 0.55 * weight_bytes(res.realized.mod)
    x = zoo.mnist_data("test")[0][:BATCH]
    host = relax.VirtualMachine(tvm.compile(res.realized.mod, target=cpu_target), tvm.cpu())
    ref = host["main"](tvm.runtime.tensor(x)).numpy()
    out = qemu.run_under_qemu(tmp_path / "model.so", [x], cpu=spec.target["mcpu"], timeout=300)[0]
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
