"""AMX int8 conv2d (``hago.backends.amx.conv_int8``): bit-exact against ``tests/intref.py``, and in a network.

Each case is a uint8 NCHW16c input (channels padded with the zero point), int8 OIHW weights and per-channel
requantize constants; the reference is a numpy int64 conv of the zero-point-padded input, plus the bias,
requantized by ``intref.rescale_fixed_point`` (round half away from zero), plus the output zero point,
clipped, laid out NCHW16c with the padded output channels at the zero point. All cases are one module: one
build. Channel counts that are not multiples of 16 or 64, 3x3, 1x1, strides 2, asymmetric padding, batch 2,
both tile modes and the in-place (16-channel) and packed (32/64-channel) K steps are covered.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from hago.backends.amx.conv_int8 import (amx_int8_conv_applicable, amx_int8_pays, amx_int8_taps_pays,
                                         int8_geometry)
from hago.backends.amx.permission import amx_available
from hago.backends.base import Requant
from intref import rescale_fixed_point

needs_amx = pytest.mark.skipif(amx_available() is not None, reason=str(amx_available()))
TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    c: int
    hw: tuple[int, int]
    o: int
    k: int
    stride: int
    padding: tuple[int, int, int, int]
    kb: int | None = None  # forced K step (None: int8_geometry's choice)
    mode: str | None = None  # forced tile mode
    taps: bool = False  # plain NCHW input, kernel columns folded into K (emit_conv2d_amx_int8_taps)
    float_requant: bool = False  # requantize with a float32 scale (a spec's requantize: float)


CASES = {
    "3x3_64_pad1": Case(1, 64, (14, 14), 64, 3, 1, (1, 1, 1, 1)),
    "3x3_s2_c40_o20_batch2": Case(2, 40, (9, 11), 20, 3, 2, (1, 1, 1, 1)),
    "1x1_c32_o48_in_place": Case(1, 32, (10, 10), 48, 1, 1, (0, 0, 0, 0)),
    "1x1_c72_o100_packed64": Case(1, 72, (6, 9), 100, 1, 1, (0, 0, 0, 0), kb=64),
    "1x1_s2_c96": Case(1, 96, (14, 14), 32, 1, 2, (0, 0, 0, 0)),
    "3x3_s2_asym_pad_c24": Case(1, 24, (9, 17), 20, 3, 2, (0, 1, 1, 0)),
    "3x3_7x7_image_tiles": Case(1, 128, (7, 7), 64, 3, 1, (1, 1, 1, 1), mode="image"),
    "5x5_pad2_rows_c48": Case(1, 48, (8, 8), 16, 5, 1, (2, 2, 2, 2), mode="rows"),
    "taps_rgb_7x7_s2": Case(1, 3, (30, 30), 64, 7, 2, (3, 3, 3, 3), taps=True),
    "taps_rgb_3x3_s2_o20": Case(2, 3, (17, 17), 20, 3, 2, (1, 1, 1, 1), taps=True),
    "taps_gray_5x5_asym": Case(1, 1, (12, 12), 16, 5, 1, (2, 2, 1, 1), taps=True),
    "float_requant_3x3_c40": Case(1, 40, (10, 10), 48, 3, 1, (1, 1, 1, 1), float_requant=True),
    "float_requant_taps_rgb": Case(1, 3, (20, 20), 32, 3, 2, (1, 1, 1, 1), taps=True, float_requant=True),
}


def _np_conv(x, w, stride, padding, zp):
    t, l, b, r = padding
    x = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=zp).astype(np.int64)
    o, _, kh, kw = w.shape
    oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], o, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            tap = x[:, :, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
            out += np.einsum("nchw,oc->nohw", tap, w[:, :, i, j].astype(np.int64))
    return out


def _blocked(a: np.ndarray, fill: int) -> np.ndarray:
    n, c = a.shape[:2]
    cb = -(-c // 16)
    out = np.full((n, cb * 16, *a.shape[2:]), fill, a.dtype)
    out[:, :c] = a
    return np.ascontiguousarray(out.reshape(n, cb, 16, *a.shape[2:]).transpose(0, 1, 3, 4, 2))


def _case_data(name: str, case: Case):
    """(blocked x, int8 w, requant, zero point, blocked reference output)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    zx, zy = int(rng.integers(0, 256)), int(rng.integers(0, 256))
    x = rng.integers(0, 256, (case.n, case.c, *case.hw), dtype=np.uint8)
    w = rng.integers(-128, 128, (case.o, case.c, case.k, case.k), dtype=np.int8)
    acc = _np_conv(x, w, case.stride, case.padding, zx)
    bias = rng.integers(-5000, 5000, case.o).astype(np.int32)
    mult = rng.integers(2**29, 2**30, case.o).astype(np.int32)
    spread = float((acc + bias[None, :, None, None]).std())
    shift = np.full(case.o, int(np.round(np.log2(spread * 2**30 / 40))), np.int64)  # outputs span the range
    shift[::3] += 1
    if case.float_requant:  # realize's float requantize: round(f32(acc + bias) * f32 scale) + zp, clipped
        scale = (mult.astype(np.float64) / 2.0 ** shift).astype(np.float32)
        rq = Requant(bias, None, None, zy, 0, 255, "uint8", scale=scale)
        f = (acc + bias[None, :, None, None]).astype(np.int32).astype(np.float32) * scale[None, :, None, None]
        ref = np.clip(np.rint(f) + np.float32(zy), 0, 255).astype(np.uint8)
    else:
        rq = Requant(bias, mult, shift, zy, 0, 255, "uint8")
        ref = rescale_fixed_point(acc + bias[None, :, None, None], mult.astype(np.int64), shift, axis=1) + zy
        ref = np.clip(ref, 0, 255).astype(np.uint8)
    return (x if case.taps else _blocked(x, zx)), w, rq, zx, _blocked(ref, zy)


@pytest.fixture(scope="module")
def built():
    import tvm
    from tvm import relax

    from hago.backends.amx.conv_int8 import emit_conv2d_amx_int8, emit_conv2d_amx_int8_taps
    from hago.backends.registry import get_backend

    bb, cases = relax.BlockBuilder(), {}
    for name, case in CASES.items():
        xb, w, rq, zx, ref = _case_data(name, case)
        g = None
        if not case.taps:
            g = int8_geometry(xb.shape, w.shape, (case.stride,) * 2, case.padding)
            g = dataclasses.replace(g, kb=case.kb or g.k_block, force_mode=case.mode)
        v = relax.Var("x", relax.TensorType(xb.shape, "uint8"))
        with bb.function(name, [v]):
            with bb.dataflow():
                if case.taps:
                    y = emit_conv2d_amx_int8_taps(bb, v, w, (case.stride,) * 2, case.padding, zx, rq)
                else:
                    y = emit_conv2d_amx_int8(bb, v, w, (case.stride,) * 2, case.padding, zx, rq, g=g)
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        cases[name] = (xb, ref, g, np.unique(ref).size)
    target = tvm.target.Target(TARGET)
    with target:
        ex = get_backend("x86").build(bb.get(), target)
    return ex, cases


def test_applicability_and_rule():
    assert amx_int8_conv_applicable((1, 4, 14, 14, 16), (64, 64, 3, 3), (1, 1), (1, 1), 1)
    assert amx_int8_conv_applicable((1, 3, 14, 14, 16), (20, 40, 3, 3), (2, 2), (1, 1), 1)
    assert not amx_int8_conv_applicable((1, 4, 14, 14, 16), (64, 64, 3, 3), (1, 1), (2, 2), 1)  # dilation
    assert not amx_int8_conv_applicable((1, 4, 14, 14, 16), (64, 16, 3, 3), (1, 1), (1, 1), 4)  # groups
    assert not amx_int8_conv_applicable((1, 64, 14, 14), (64, 64, 3, 3), (1, 1), (1, 1), 1)  # NCHW
    assert not amx_int8_conv_applicable((1, 4, 14, 14, 16), (64, 40, 3, 3), (1, 1), (1, 1), 1)  # 40 != 49..64
    # the measured rule: pointwise from 64 channels, windows from 32
    assert amx_int8_pays(int8_geometry((1, 4, 14, 14, 16), (96, 64, 1, 1), (1, 1), (0, 0)))
    assert not amx_int8_pays(int8_geometry((1, 1, 112, 112, 16), (96, 16, 1, 1), (1, 1), (0, 0)))
    assert amx_int8_pays(int8_geometry((1, 2, 28, 28, 16), (32, 32, 3, 3), (1, 1), (1, 1)))
    assert amx_int8_taps_pays((64, 3, 7, 7)) and not amx_int8_taps_pays((32, 3, 3, 3))  # stems: K 147 vs 27
    # K steps: padded convs pack to full rows, pointwise ones read the 16-channel blocks in place
    assert int8_geometry((1, 4, 14, 14, 16), (64, 64, 3, 3), (1, 1), (1, 1)).k_block == 64
    assert int8_geometry((1, 2, 14, 14, 16), (64, 24, 3, 3), (1, 1), (1, 1)).k_block == 32
    assert int8_geometry((1, 4, 14, 14, 16), (64, 64, 1, 1), (1, 1), (0, 0)).k_block == 16


@needs_amx
@pytest.mark.parametrize("name", list(CASES))
def test_bit_exact_against_intref(built, name):
    import tvm
    from tvm import relax

    ex, cases = built
    xb, ref, g, distinct = cases[name]
    got = relax.VirtualMachine(ex, tvm.cpu())[name](tvm.runtime.tensor(xb)).numpy()
    assert got.dtype == np.uint8 and got.shape == ref.shape
    assert distinct > 50, "the requantized outputs span the range"
    np.testing.assert_array_equal(got, ref)


@needs_amx
def test_case_geometries_cover_both_k_steps_and_modes(built):
    geos = [g for _, _, g, _ in built[1].values() if g is not None]
    assert {g.k_block for g in geos} == {16, 32, 64} and {g.mode for g in geos} == {"rows", "image"}


@needs_amx
def test_assembly_has_tdpbusd(built):
    asm = built[0].mod.imports[0].inspect_source("asm")
    for needed in ("tdpbusd", "tileloadd", "tilestored", "ldtilecfg", "tilerelease"):
        assert needed in asm, f"{needed} missing from the build"


@needs_amx
def test_network_on_x86_amx_runs_amx_convs_bit_exact(run_tvm):
    """A small CNN quantized for x86-amx: its RGB stem, blocked 3x3 and wide 1x1 convs run on AMX, the
    24-channel 1x1 on VNNI, the depthwise on its blocked kernel, all requantizing with the spec's float
    scales on their tiles; the output equals the plain-layout integer program's (realize's element-wise float
    requantize) bit for bit."""
    import tvm
    from tvm import relax
    from torch import nn

    from hago.build import build, target_of
    from hago.compiler import quantize, static_pair
    from hago.hwspec import HardwareSpec

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 5, padding=2)
            self.c3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
            self.pw = nn.Conv2d(64, 80, 1)
            self.dw = nn.Conv2d(80, 80, 3, padding=1, groups=80)
            self.narrow = nn.Conv2d(80, 24, 1)
            self.up = nn.Conv2d(24, 48, 1)

        def forward(self, x):
            y = torch.relu(self.c3(torch.relu(self.stem(x))))
            y = torch.relu(self.dw(torch.relu(self.pw(y))))
            return self.up(self.narrow(y)).mean((2, 3))

    torch.manual_seed(0)
    net = Net().eval()
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    outs, texts = {}, {}
    for device in ("x86-amx",):
        spec = HardwareSpec.load(device)
        q = quantize(net, spec, {"x": x}, calibrator="minmax", example_inputs=(torch.from_numpy(x[:2]),),
                     corrections=[])
        _, int_mod = static_pair(q, spec, 2)
        texts[device] = int_mod.script(show_meta=False)
        vm = relax.VirtualMachine(build(int_mod, target_of(spec)), tvm.cpu())
        outs[device] = vm["main"](tvm.runtime.tensor(x[:2])).numpy()
        np.testing.assert_array_equal(outs[device], run_tvm(q.realized.mod, x[:2]))
    amx = len(re.findall(r"call_tir\(cls\.hago_conv2d_amx_int8\d*,", texts["x86-amx"]))
    vnni = len(re.findall(r"call_tir\(cls\.hago_conv2d_nchwc_vnni\d*,", texts["x86-amx"]))
    # stem (RGB 5x5: K = 75, columns in K), c3 (3x3, 32 channels), pw (1x1, 64), narrow (1x1, 80) on AMX;
    # up (1x1, 24) on VNNI
    assert (amx, vnni) == (4, 1)
    assert "hago_nchw_to_nchwc" in texts["x86-amx"]  # the stem's input packed once
    assert np.abs(outs["x86-amx"]).max() > 0
    assert HardwareSpec.load("x86-amx").requantize == "float"
