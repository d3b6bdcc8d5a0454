"""Depthwise int8 kernel: bit-exact against ``tests/intref.py`` and the plain Relax conv2d.

All cases go into one Relax module (two functions each: the kernel and the
plain ``conv2d(pad(x), groups=C, out_dtype="int32")``) so the file pays a
single build, through ``hago.lower`` as ``build.build`` does.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import intref
from hago.backends.x86.kernels import (SCHEDULES, Requant, depthwise_applicable, emit_conv2d_depthwise,
                          emit_conv2d_depthwise_blocked, schedule_vnni)
from hago.backends.x86.depthwise import DEPTHWISE, depthwise_tile, vector_lanes
from hago.backends.x86.depthwise_blocked import DEPTHWISE_NCHWC

TARGET = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}

# name -> (x shape NCHW, w shape [O, 1, KH, KW], strides, padding (t, l, b, r), dilation, zero point)
CASES = {
    "s1_3x3_w20": ((1, 16, 12, 20), (16, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 7),  # 20 -> 2 vectors + slice
    "s2_3x3_b2": ((2, 32, 15, 15), (32, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 128),  # stride 2: even/odd split
    "s2_5x5_asym": ((1, 16, 14, 14), (16, 1, 5, 5), (2, 2), (1, 1, 2, 2), (1, 1), 3),  # TF-style asymmetric pad
    "s1_5x5_w7": ((1, 48, 7, 7), (48, 1, 5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 255),  # 7 columns: one ymm
    "s1_nopad_w4": ((1, 8, 6, 6), (8, 1, 3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 0),  # 4 columns: one xmm
    "s1_dil2_w16": ((1, 16, 20, 20), (16, 1, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 9),  # exactly one zmm
    "s3_3x3": ((1, 8, 16, 17), (8, 1, 3, 3), (3, 3), (1, 1, 1, 1), (1, 1), 5),  # stride 3: gathered split
    "mult2_3x2": ((1, 8, 9, 11), (16, 1, 3, 2), (1, 2), (0, 1, 0, 0), (1, 1), 1),  # channel multiplier 2
    "s1_3x3_c24": ((1, 24, 10, 13), (24, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 11),  # 24 channels: 2 blocks
    "s1_nopad_c20": ((1, 20, 10, 18), (20, 1, 3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 6),
}
# requantizing write-back: name -> (case, output dtype, qmin, qmax, zero point)
REQUANT = {
    "rq_s1_w20_u8": ("s1_3x3_w20", "uint8", 0, 255, 3),
    "rq_s2_b2_relu6": ("s2_3x3_b2", "uint8", 10, 200, 10),  # a clip range narrower than the dtype
    "rq_w7_s8": ("s1_5x5_w7", "int8", -128, 127, -5),
    "rq_mult2_u8": ("mult2_3x2", "uint8", 0, 255, 128),
    "rq_c24_u8": ("s1_3x3_c24", "uint8", 0, 255, 4),
    "rq_nopad_u8": ("s1_nopad_c20", "uint8", 0, 255, 2),
    "rq_s2_5x5_asym_u8": ("s2_5x5_asym", "uint8", 0, 255, 6),  # padding read in place, asymmetric, stride 2
}
# the NCHW16c kernel (one filter per channel): these requantizing cases, blocked in and out
BLOCKED = ["rq_s1_w20_u8", "rq_s2_b2_relu6", "rq_w7_s8", "rq_c24_u8", "rq_nopad_u8", "rq_s2_5x5_asym_u8"]
IN_PAD = 77  # what the input's padded channels hold: their zero weights must ignore it


def to_blocked(x: np.ndarray, fill: int) -> np.ndarray:
    """NCHW -> NCHW16c, channels padded to 16 with ``fill``."""
    n, c, h, w = x.shape
    cb = -(-c // 16)
    xp = np.full((n, cb * 16, h, w), fill, x.dtype)
    xp[:, :c] = x
    return np.ascontiguousarray(xp.reshape(n, cb, 16, h, w).transpose(0, 1, 3, 4, 2))


def from_blocked(y: np.ndarray) -> np.ndarray:
    n, cb, h, w, _ = y.shape
    return y.transpose(0, 1, 4, 2, 3).reshape(n, cb * 16, h, w)


def _data(name, xs, ws):
    rng = np.random.default_rng(sum(map(ord, name)))
    return rng.integers(0, 256, xs, dtype=np.uint8), rng.integers(-128, 128, ws, dtype=np.int8)


def _requant(name, channels):
    """Per-channel bias / multiplier / shift as realize derives them (scales spread over 2**-20 .. 2**-6)."""
    case, dtype, qmin, qmax, zp = REQUANT[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    mult, shift = intref.decompose_scale(np.exp2(rng.uniform(-20, -6, channels)))
    bias = rng.integers(-2**20, 2**20, channels).astype(np.int32)
    return Requant(bias, mult.astype(np.int32), shift.astype(np.int32), zp, qmin, qmax, dtype)


def reference(x, w, strides, padding, dilation, zp) -> np.ndarray:
    """The kernel's contract: conv of x padded with zp, i.e. intref's centred conv + zp * sum(w)."""
    acc = intref.conv2d_int(x, w, zp, strides, padding, dilation, groups=x.shape[1]).astype(np.int64)
    return (acc + zp * w.astype(np.int64).sum(axis=(1, 2, 3)).reshape(1, -1, 1, 1)).astype(np.int32)


# ---- no build needed ------------------------------------------------------------
def test_depthwise_applicable():
    assert depthwise_applicable((1, 32, 8, 8), (32, 1, 3, 3), 32)
    assert depthwise_applicable((1, 8, 8, 8), (16, 1, 3, 3), 8)  # multiplier 2
    assert not depthwise_applicable((1, 32, 8, 8), (64, 8, 3, 3), 4)  # grouped, not depthwise
    assert not depthwise_applicable((1, 1, 8, 8), (1, 1, 3, 3), 1)  # a plain conv
    assert not depthwise_applicable(("n", 32, 8, 8), (32, 1, 3, 3), 32)  # dynamic batch


def test_tile_and_lanes():
    assert [vector_lanes(w) for w in (3, 4, 5, 8, 9, 112)] == [4, 4, 8, 8, 16, 16]
    for oh, chunks in [(112, 7), (56, 4), (7, 1), (13, 2), (1, 1)]:
        r, c = depthwise_tile(oh, chunks)
        assert oh % r == 0 and chunks % c == 0 and r * c <= 16
    assert depthwise_tile(112, 7) == (16, 1)  # most accumulators first, then the widest tile
    assert depthwise_tile(56, 4) == (4, 4)


def test_registered():
    assert DEPTHWISE in SCHEDULES and DEPTHWISE_NCHWC in SCHEDULES


# ---- one build for all cases -------------------------------------------------------
@pytest.fixture(scope="module")
def built():
    import tvm
    from tvm import relax
    from tvm.relax import op as O

    from hago.lower import finish, fuse

    bb = relax.BlockBuilder()
    cases = {}
    for name, (xs, ws, strides, padding, dilation, zp) in CASES.items():
        x_np, w_np = _data(name, xs, ws)
        x = relax.Var("x", relax.TensorType(xs, "uint8"))
        with bb.function(name, [x]):
            with bb.dataflow():
                out = bb.emit_output(emit_conv2d_depthwise(bb, x, w_np, strides, padding, dilation, pad_value=zp))
            bb.emit_func_output(out)
        x = relax.Var("x", relax.TensorType(xs, "uint8"))
        with bb.function(name + "_plain", [x]):
            with bb.dataflow():
                t, l, b, r = padding
                xp = bb.emit(O.nn.pad(x, [0, 0, 0, 0, t, b, l, r], pad_value=float(zp)))
                out = bb.emit_output(O.nn.conv2d(xp, relax.const(w_np, "int8"), strides=strides, dilation=dilation,
                                                  groups=xs[1], out_dtype="int32"))
            bb.emit_func_output(out)
        cases[name] = (x_np, reference(x_np, w_np, strides, padding, dilation, zp))
    for name, (case, *_) in REQUANT.items():
        xs, ws, strides, padding, dilation, zp = CASES[case]
        x_np, w_np = _data(case, xs, ws)
        rq = _requant(name, ws[0])
        x = relax.Var("x", relax.TensorType(xs, "uint8"))
        with bb.function(name, [x]):
            with bb.dataflow():
                out = bb.emit_output(emit_conv2d_depthwise(bb, x, w_np, strides, padding, dilation, pad_value=zp,
                                                           requant=rq))
            bb.emit_func_output(out)
        acc = cases[case][1].astype(np.int64) + rq.bias.reshape(1, -1, 1, 1)
        ref = intref.requantize_fixed_point(acc.astype(np.int32), rq.multiplier, rq.shift, rq.zero_point, rq.qmin,
                                            rq.qmax, axis=1, out_dtype=rq.dtype)
        cases[name] = (x_np, ref)
        if name in BLOCKED:
            xb = relax.Var("x", relax.TensorType(to_blocked(x_np, IN_PAD).shape, "uint8"))
            with bb.function(name + "_blocked", [xb]):
                with bb.dataflow():
                    out = bb.emit_output(emit_conv2d_depthwise_blocked(bb, xb, w_np, rq, strides, padding, dilation,
                                                                       pad_value=zp))
                bb.emit_func_output(out)
    target = tvm.target.Target(TARGET)
    mod = schedule_vnni(bb.get(), target)
    return mod, finish(fuse(mod, target), target), cases


@pytest.mark.llvm
@pytest.mark.parametrize("name", list(REQUANT))
def test_requantizing_write_back_bit_exact(built, name):
    import tvm
    from tvm import relax

    _, ex, cases = built
    x, ref = cases[name]
    out = relax.VirtualMachine(ex, tvm.cpu())[name](tvm.runtime.tensor(x)).numpy()
    assert out.dtype == ref.dtype == np.dtype(REQUANT[name][1]) and out.shape == ref.shape
    assert np.array_equal(out, ref)
    assert len(np.unique(out)) > 20  # not a degenerate all-clipped output


@pytest.mark.llvm
@pytest.mark.parametrize("name", BLOCKED)
def test_blocked_kernel_bit_exact(built, name):
    """NCHW16c in and out: the same requantized values, and the padded output channels at the zero point."""
    import tvm
    from tvm import relax

    _, ex, cases = built
    x, ref = cases[name]
    c = x.shape[1]
    out = from_blocked(relax.VirtualMachine(ex, tvm.cpu())[name + "_blocked"](tvm.runtime.tensor(to_blocked(x, IN_PAD)))
                       .numpy())
    assert out.dtype == ref.dtype and out.shape[2:] == ref.shape[2:]
    assert np.array_equal(out[:, :c], ref)
    assert (out[:, c:] == REQUANT[name][4]).all()


@pytest.mark.llvm
@pytest.mark.parametrize("name", list(CASES))
def test_bit_exact(built, name):
    import tvm
    from tvm import relax

    _, ex, cases = built
    x, ref = cases[name]
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm[name](tvm.runtime.tensor(x)).numpy()
    assert out.dtype == np.int32 and out.shape == ref.shape
    assert np.array_equal(out, ref)
    assert np.array_equal(vm[name + "_plain"](tvm.runtime.tensor(x)).numpy(), ref)  # the reference is the op's


@pytest.mark.llvm
def test_kernels_scheduled_and_vectorized(built):

    mod, ex, _ = built
    kernels = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("hago_conv2d_depthwise")]
    assert len(kernels) == len(CASES) + len(REQUANT) + len(BLOCKED)
    assert all(f.attrs["tirx.is_scheduled"] and int(f.attrs["op_pattern"]) == 8 for f in kernels)
    asm = ex.mod.imports[0].inspect_source("asm")
    assert "vpmovzxbd" in asm and ("vpdpwssd" in asm or "vpmaddwd" in asm)  # widened u8 x s8 multiply-adds
    assert "vpmovwb" in asm  # the stride-2 even/odd split is shuffles, not a byte gather


@pytest.mark.llvm
def test_non_vnni_target_still_schedules_depthwise():
    """The depthwise schedule is plain vector code: an AVX2 target gets it, the VNNI kernels do not."""
    import tvm
    from tvm import relax

    x_np, w_np = _data("avx2", (1, 8, 10, 10), (8, 1, 3, 3))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_np.shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit_conv2d_depthwise(bb, x, w_np, padding=(1, 1, 1, 1), pad_value=3))
        bb.emit_func_output(out)
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    mod = schedule_vnni(bb.get(), avx2)
    assert mod["hago_conv2d_depthwise"].attrs["tirx.is_scheduled"]
    ex = tvm.compile(mod, target=avx2)  # haswell code runs on any AVX2 host
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x_np)).numpy()
    assert np.array_equal(out, reference(x_np, w_np, (1, 1), (1, 1, 1, 1), (1, 1), 3))


@pytest.mark.llvm
def test_realized_network_uses_kernel_bit_exact(run_tvm):
    """realize picks the kernel (requantizing write-back) on a static build; outputs equal the plain conv path."""
    import torch
    import tvm
    from torch import nn
    from tvm import relax

    from hago.build import build
    from hago.compiler import quantize, static_pair
    from hago.hwspec import HardwareSpec

    spec = HardwareSpec.load("x86-avx512-vnni")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),  # stride 1, requantized in the kernel
        nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16),  # stride 2, signed output range
        nn.Conv2d(16, 4, 1),
    ).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 13, 13)).astype(np.float32)
    q = quantize(model, spec, {"input": x}, calibrator="minmax", example_inputs=(torch.from_numpy(x[:2]),))
    _, int_mod = static_pair(q, spec, 2)
    dyn = q.realized.mod.script(show_meta=False)
    static = int_mod.script(show_meta=False)
    assert "hago_conv2d_depthwise" not in dyn and "R.nn.conv2d" in dyn  # dynamic batch: the plain conv
    assert len(re.findall(r"call_tir\(cls\.hago_conv2d_depthwise", static)) == 2 and "groups=16" not in static
    ex = build(int_mod, tvm.target.Target(spec.target))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x[:2])).numpy()
    np.testing.assert_array_equal(out, run_tvm(q.realized.mod, x[:2]))


@pytest.mark.parametrize("k, stride, cols", [(3, 1, 16), (3, 2, 16), (5, 1, 16), (5, 2, 8)])
def test_blocked_tile_width_follows_filter_and_stride(k, stride, cols):
    """The emitter's tile choice reaches the schedule: 16 columns, 8 for 5x5 stride 2 (whose 16 spill)."""
    import tvm
    from tvm import relax

    w = np.ones((32, 1, k, k), np.int8)
    rq = Requant(np.zeros(32, np.int32), np.full(32, 1 << 30, np.int32), np.full(32, 31, np.int32), 0, 0, 255, "uint8")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 64, 64, 16), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            p = k // 2
            out = bb.emit_output(emit_conv2d_depthwise_blocked(bb, x, w, rq, (stride, stride), (p, p, p, p)))
        bb.emit_func_output(out)
    mod = schedule_vnni(bb.get(), tvm.target.Target(TARGET))
    kernel = next(f for gv, f in mod.functions_items() if "depthwise" in gv.name_hint)
    unrolled = {int(m) for m in re.findall(r"T\.unroll\(T\.int64\((\d+)\)\)", kernel.script())}
    assert cols in unrolled and not {c for c in unrolled if c > cols}
