"""VNNI kernels: bit-exact against numpy int32 references, and ``vpdpbusd`` in the build.

All cases go into one Relax module (one function each) so the suite pays a
single ``tvm.compile``. References are plain numpy: ``x @ w`` for dense and
an im2col einsum for conv2d, both in int64 then cast to int32.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from hago.backends.x86.kernels import (
    ScheduleVNNI,
    emit_conv2d_vnni,
    emit_dense_vnni,
    pack_conv_weight,
    pack_dense_weight,
    schedule_vnni,
    vnni_applicable,
)
from hago.backends.x86.vnni_schedule import register_tile

TARGET = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}

# name -> (x shape, w shape); dense w is [K, N]
DENSE = {
    "d_64x256x128": ((64, 256), (256, 128)),
    "d_odd_7x30x20": ((7, 30), (30, 20)),  # K % 4, N % 16 and M all ragged
    "d_batched_2x3x64x40": ((2, 3, 64), (64, 40)),
    "d_m1_100x10": ((1, 100), (100, 10)),
}
# name -> (x shape NCHW, w shape OIHW, strides, dilation, groups)
CONV = {
    "c_3x3_b2": ((2, 32, 12, 12), (48, 32, 3, 3), (1, 1), (1, 1), 1),
    "c_rgb_s2": ((1, 3, 17, 17), (20, 3, 3, 3), (2, 2), (1, 1), 1),  # C=3 -> 4, O=20 -> 32
    "c_1x1_odd": ((2, 40, 9, 9), (24, 40, 1, 1), (1, 1), (1, 1), 1),
    "c_1x1_s2": ((1, 64, 14, 14), (128, 64, 1, 1), (2, 2), (1, 1), 1),
    "c_dil2": ((1, 24, 11, 11), (16, 24, 3, 3), (1, 1), (2, 2), 1),
    "c_groups4": ((1, 32, 9, 9), (64, 8, 3, 3), (1, 1), (1, 1), 4),
}
# padded in the NCHW -> NCHW16c conversion: name -> (case above, padding (t, l, b, r), zero point)
CONV_PAD = {
    "p_3x3_b2": ("c_3x3_b2", (1, 1, 1, 1), 37),
    "p_rgb_s2_asym": ("c_rgb_s2", (0, 0, 1, 1), 128),  # 3 -> 4 channels and spatial padding together
    "p_dil2": ("c_dil2", (2, 2, 2, 2), 255),
    "p_groups4": ("c_groups4", (1, 2, 1, 0), 5),
}


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)))


def _data(name: str, xs, ws):
    rng = _rng(name)
    return rng.integers(0, 256, xs, dtype=np.uint8), rng.integers(-128, 128, ws, dtype=np.int8)


def np_dense(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (x.astype(np.int64) @ w.astype(np.int64)).astype(np.int32)


def np_conv2d(x, w, strides, dilation, groups) -> np.ndarray:
    """im2col + einsum, per group, no padding."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h - (kh - 1) * dh - 1) // sh + 1, (wd - (kw - 1) * dw - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
    og = o // groups
    out = [np.einsum("nckhxy,ockh->noxy", cols[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og].astype(np.int64))
           for g in range(groups)]
    return np.concatenate(out, axis=1).astype(np.int32)


# ---- no build needed ------------------------------------------------------
def test_pack_dense_weight_layout():
    w = _rng("pack").integers(-128, 128, (30, 20), dtype=np.int8)
    p = pack_dense_weight(w)
    assert p.shape == (2, 8, 16, 4)
    k, n = np.meshgrid(np.arange(30), np.arange(20), indexing="ij")
    assert np.array_equal(p[n // 16, k // 4, n % 16, k % 4], w)
    assert not p[1, :, 4:].any() and not p[:, 7, :, 2:].any()  # padding is zero


def test_pack_conv_weight_layout():
    w = _rng("packc").integers(-128, 128, (20, 24, 3, 3), dtype=np.int8)
    p = pack_conv_weight(w)  # 24 input channels -> block 8
    assert p.shape == (2, 3, 3, 3, 2, 16, 4)
    o, i = np.meshgrid(np.arange(20), np.arange(24), indexing="ij")
    assert np.array_equal(p[o // 16, i // 8, 1, 2, (i % 8) // 4, o % 16, i % 4], w[:, :, 1, 2])
    assert not p[1, :, :, :, :, 4:].any()


def test_vnni_applicable():
    assert vnni_applicable("dense", (8, 30), (30, 20))
    assert not vnni_applicable("dense", (8, 30), (31, 20))
    assert vnni_applicable("conv2d", (1, 3, 8, 8), (16, 3, 3, 3))
    assert vnni_applicable("conv2d", (1, 32, 8, 8), (64, 8, 3, 3), groups=4)
    assert not vnni_applicable("conv2d", (1, 32, 8, 8), (32, 1, 3, 3), groups=32)  # depthwise
    assert not vnni_applicable("conv2d", (1, 32, 8, 8), (40, 8, 3, 3), groups=4)  # 10 outputs per group
    assert not vnni_applicable("conv2d", ("n", 32, 8, 8), (16, 32, 3, 3))  # dynamic batch


def test_register_tile_divides_and_fits():
    for rows, blocks in [(64, 64), (56, 4), (7, 2), (1, 63), (97, 8)]:
        r, b = register_tile(rows, blocks)
        assert rows % r == 0 and blocks % b == 0 and r * b <= 24
    assert register_tile(64, 64) == (4, 4)


def test_intrinsic_does_not_import_shipped_intrinsics():
    """hago's own intrinsic avoids the ~30 s ``import tvm.s_tir.tensor_intrin``."""
    code = ("import sys; from hago.backends.x86.kernels import vnni_intrin; vnni_intrin(); "
            "assert 'tvm.s_tir.tensor_intrin' not in sys.modules, 'slow import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- one build for all kernels --------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    cases = {}
    for name, (xs, ws) in DENSE.items():
        x_np, w_np = _data(name, xs, ws)
        x = relax.Var("x", relax.TensorType(xs, "uint8"))
        with bb.function(name, [x]):
            with bb.dataflow():
                out = bb.emit_output(emit_dense_vnni(bb, x, w_np))
            bb.emit_func_output(out)
        cases[name] = (x_np, np_dense(x_np, w_np))
    for name, (xs, ws, strides, dilation, groups) in CONV.items():
        x_np, w_np = _data(name, xs, ws)
        x = relax.Var("x", relax.TensorType(xs, "uint8"))
        with bb.function(name, [x]):
            with bb.dataflow():
                out = bb.emit_output(emit_conv2d_vnni(bb, x, w_np, strides, dilation, groups))
            bb.emit_func_output(out)
        cases[name] = (x_np, np_conv2d(x_np, w_np, strides, dilation, groups))
    for name, (case, padding, zp) in CONV_PAD.items():
        xs, ws, strides, dilation, groups = CONV[case]
        x_np, w_np = _data(name, xs, ws)
        x = relax.Var("x", relax.TensorType(xs, "uint8"))
        with bb.function(name, [x]):
            with bb.dataflow():
                out = bb.emit_output(emit_conv2d_vnni(bb, x, w_np, strides, dilation, groups, padding, zp))
            bb.emit_func_output(out)
        t, l, b, r = padding
        xp = np.pad(x_np, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=zp)
        cases[name] = (x_np, np_conv2d(xp, w_np, strides, dilation, groups))
    target = tvm.target.Target(TARGET)
    mod = schedule_vnni(bb.get(), target)
    ex = tvm.compile(mod, target=target)
    so = tmp_path_factory.mktemp("vnni") / "kernels.so"
    ex.export_library(str(so))
    return mod, ex, so, cases


@pytest.mark.llvm
@pytest.mark.parametrize("name", [*DENSE, *CONV, *CONV_PAD])
def test_bit_exact(built, name):
    import tvm
    from tvm import relax

    _, ex, _, cases = built
    x, ref = cases[name]
    out = relax.VirtualMachine(ex, tvm.cpu())[name](tvm.runtime.tensor(x)).numpy()
    assert out.dtype == np.int32 and out.shape == ref.shape
    assert np.array_equal(out, ref)


@pytest.mark.llvm
def test_every_kernel_is_scheduled(built):
    import tvm

    mod = built[0]
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    # a dense, or NCHW -> NCHW16c, conv, NCHW16c -> NCHW per case (identical conversions are shared), + K-padding
    assert len(kernels) >= len(DENSE) + 2 * (len(CONV) + len(CONV_PAD)) + 1
    for name, f in kernels.items():
        if name.startswith("hago_pad_k"):
            continue
        assert f.attrs["tirx.is_scheduled"], name


@pytest.mark.llvm
def test_assembly_has_vpdpbusd(built):
    asm = built[1].mod.imports[0].inspect_source("asm")
    assert len(re.findall(r"\bvpdpbusd\b", asm)) >= len(DENSE) + len(CONV)


@pytest.mark.llvm
def test_exported_library_has_vpdpbusd_and_runs(built):
    import tvm
    from tvm import relax

    so, cases = built[2], built[3]
    dis = subprocess.run(["objdump", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    assert "vpdpbusd" in dis
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())
    x, ref = cases["c_3x3_b2"]
    assert np.array_equal(vm["c_3x3_b2"](tvm.runtime.tensor(x)).numpy(), ref)


def test_schedule_vnni_leaves_other_functions_alone():
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit_te(lambda a: a + 1.0, x))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    assert schedule_vnni(mod, tvm.target.Target(TARGET)).same_as(mod)


@pytest.mark.llvm
def test_target_without_vnni_keeps_naive_correct_kernels():
    """skylake-avx512 has no vpdpbusd: schedule_vnni declines, the naive kernel still matches."""
    import tvm
    from tvm import relax

    x_np, w_np = _data("skx", (5, 30), (30, 20))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_np.shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit_dense_vnni(bb, x, w_np))
        bb.emit_func_output(out)
    mod = bb.get()
    skx = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    assert schedule_vnni(mod, skx).same_as(mod)
    with skx:
        passed = ScheduleVNNI()(mod)
    assert not any(f.attrs and "tirx.is_scheduled" in f.attrs for _, f in passed.functions_items())
    ex = tvm.compile(mod, target=skx)
    assert "vpdpbusd" not in ex.mod.imports[0].inspect_source("asm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x_np)).numpy()
    assert np.array_equal(out, np_dense(x_np, w_np))


def _static_int_mod(model, x):
    import torch

    from hago.compiler import quantize, static_pair
    from hago.hwspec import HardwareSpec

    spec = HardwareSpec.load("x86-avx512-vnni")
    q = quantize(model, spec, {"x": x}, calibrator="minmax", example_inputs=(torch.from_numpy(x[:2]),))
    _, int_mod = static_pair(q, spec, 2)
    return spec, q, int_mod


def _run_static(spec, int_mod, x):
    import tvm
    from tvm import relax

    from hago.build import build

    ex = build(int_mod, tvm.target.Target(spec.target))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _calls(text: str, func: str) -> list[str]:
    """The output dtypes of every ``call_tir`` of ``func`` (numbered variants included)."""
    return re.findall(rf"call_tir\(cls\.{func}\d*, .*?out_ty=R\.Tensor\(\([^)]*\), dtype=\"(\w+)\"\)", text)


def test_vnni_conv_requantizes_in_its_write_back_bit_exact(run_tvm):
    """A VNNI conv whose integer output feeds an NCHW-only op (here the depthwise kernel) requantizes in its
    NCHW16c -> NCHW conversion (uint8 out); the output equals the dynamic build's plain int32 conv + separate
    requantize, exactly."""
    import torch
    from torch import nn

    class ConvDepthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)

        def forward(self, x):
            return self.dw(torch.relu(self.c1(x)))

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((8, 3, 12, 12)).astype(np.float32)
    spec, q, int_mod = _static_int_mod(ConvDepthwise().eval(), x)
    text = int_mod.script(show_meta=False)
    assert len(re.findall(r"call_tir\(cls\.hago_conv2d_nchwc_vnni", text)) == 1
    assert _calls(text, "hago_nchwc_to_nchw") == ["uint8"]
    np.testing.assert_array_equal(_run_static(spec, int_mod, x[:2]), run_tvm(q.realized.mod, x[:2]))


def test_integer_layers_stay_blocked_nchw16c_bit_exact(run_tvm):
    """Between VNNI convs, relu, max-pool and a residual add the activations stay NCHW16c (channels padded to
    16 with the zero point: 24 -> 32 here): one NCHW -> NCHW16c conversion at the input, one back at the float
    output, none in between; the output equals the plain-layout integer program exactly."""
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 24, 3, padding=1), nn.Conv2d(24, 24, 3, stride=2, padding=1)
            self.c3 = nn.Conv2d(24, 24, 1)

        def forward(self, x):
            y = nn.functional.max_pool2d(torch.relu(self.c1(x)), 3, 2, 1)
            y = torch.relu(self.c2(y))
            return torch.relu(self.c3(y) + y)

    torch.manual_seed(0)
    x = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)
    spec, q, int_mod = _static_int_mod(Residual().eval(), x)
    assert all(c.mode == "integer" for c in q.strategy.ops.values())
    text = int_mod.script(show_meta=False)
    convs = _calls(text, "hago_conv2d_nchwc_vnni")
    assert convs == ["uint8"] * 3, convs  # each conv requantizes on its tiles, blocked out
    assert len(_calls(text, "hago_nchw_to_nchwc")) == 1  # the first conv's (padding, 3 -> 4 channels)
    assert _calls(text, "hago_nchwc_to_nchw") == ["uint8"]  # at the float output only
    assert "NCHW16c" in text  # the max-pool
    out = _run_static(spec, int_mod, x[:2])
    np.testing.assert_array_equal(out, run_tvm(q.realized.mod, x[:2]))
    assert np.abs(out).max() > 0




def test_inverted_residual_block_stays_blocked_bit_exact(run_tvm):
    """A MobileNetV2-style block (1x1 expand, relu6, 3x3 depthwise, relu6, 1x1 project, residual add) runs
    wholly in NCHW16c: the depthwise conv is the blocked kernel, the relu6s are folded into the kernels'
    requantize, and the only layout changes are at the float boundaries. Bit-exact against the
    plain-layout integer program."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 24, 3, stride=2, padding=1)
            self.expand, self.project = nn.Conv2d(24, 72, 1), nn.Conv2d(72, 24, 1)
            self.dw = nn.Conv2d(72, 72, 3, padding=1, groups=72)

        def forward(self, x):
            s = nn.functional.relu6(self.stem(x))
            y = nn.functional.relu6(self.dw(nn.functional.relu6(self.expand(s))))
            return self.project(y) + s

    torch.manual_seed(0)
    x = np.random.default_rng(2).standard_normal((8, 3, 20, 20)).astype(np.float32)
    spec, q, int_mod = _static_int_mod(Block().eval(), x)
    assert all(c.mode == "integer" for c in q.strategy.ops.values())
    text = int_mod.script(show_meta=False)
    assert _calls(text, "hago_conv2d_depthwise_nchwc") == ["uint8"]
    assert not re.search(r'dtype="uint8"\) = R\.clip\(', text)  # each relu6 is the clip of its kernel's requantize
    assert not re.findall(r"cls\.hago_conv2d_depthwise\d*,", text)  # no NCHW depthwise kernel
    assert len(_calls(text, "hago_nchw_to_nchwc")) == 1
    assert _calls(text, "hago_nchwc_to_nchw") == ["uint8"]
    out = _run_static(spec, int_mod, x[:2])
    np.testing.assert_array_equal(out, run_tvm(q.realized.mod, x[:2]))
    assert np.abs(out).max() > 0
