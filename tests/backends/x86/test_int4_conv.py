"""Packed 4-bit conv weights on VNNI (W4A8): bit-exact, half the bytes, ``vpdpbusd`` in the build.

The kernel cases share one Relax module (one ``tvm.compile``); each is
checked against ``tests/intref.py`` (unpack the independently packed weight,
then ``conv2d_int``, plus the zero-point padding's ``zp * sum(w)``) and
against the int8 VNNI conv on the unpacked weight, through both write-backs:
int32 NCHW, and requantized (the ``>> 4`` ahead of the bias add) from a
blocked NCHW16c input to a blocked output. The realize case quantizes a small
CNN at 4 bits on ``x86-avx512-vnni``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import intref
from hago.backends.base import Requant
from hago.backends.x86.host import cpu_flags
from hago.backends.x86.int4 import pack_int4_conv
from hago.backends.x86.kernels import (conv_int4_applicable, emit_conv2d_vnni, emit_conv2d_vnni_int4,
                                       schedule_vnni)
from hago.backends.x86.vnni_int4 import MAX_K

TARGET = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}
needs_vnni = pytest.mark.skipif("avx512_vnni" not in cpu_flags(), reason="CPU lacks avx512_vnni")

# name -> (x NCHW, w OIHW, strides, padding (top, left, bottom, right), input zero point)
CASES = {
    "3x3_c24_o20_pad": ((2, 24, 7, 7), (20, 24, 3, 3), (1, 1), (1, 1, 1, 1), 3),  # 8-channel blocks, O % 16
    "3x3_c3_o16_s2_pad": ((1, 3, 9, 9), (16, 3, 3, 3), (2, 2), (1, 1, 1, 1), 0),  # an RGB stem: 3 -> 8 channels
    "1x1_c12_o32_s2": ((2, 12, 8, 8), (32, 12, 1, 1), (2, 2), (0, 0, 0, 0), 0),  # int8 block 4, here 16
    "3x3_c32_o16_asym": ((2, 32, 6, 5), (16, 32, 3, 3), (1, 1), (0, 1, 1, 0), 128),  # two 16-channel chunks
}
EXTREME = "3x3_c64_extreme"  # x = 255 and w = -8 or 7: the largest |16 * acc| of the cases
#: blocked uint8 NCHW16c in, requantized blocked out: name -> (x NCHW, w OIHW, strides, padding, zero point)
BLOCKED_CASES = {
    "blk_3x3_c24_o20_s2": ((2, 24, 7, 7), (20, 24, 3, 3), (2, 2), (1, 1, 1, 1), 5),
    "blk_1x1_c32_o16": ((1, 32, 4, 4), (16, 32, 1, 1), (1, 1), (0, 0, 0, 0), 0),
}


def _data(name, xs, ws):
    rng = np.random.default_rng(sum(map(ord, name)))
    return rng.integers(0, 256, xs, dtype=np.uint8), rng.integers(-8, 8, ws).astype(np.int8)


def _all_cases():
    cases = {name: (*_data(name, xs, ws), st, pad, zp) for name, (xs, ws, st, pad, zp) in CASES.items()}
    w = np.where(np.arange(16 * 64 * 9).reshape(16, 64, 3, 3) % 3 == 0, 7, -8).astype(np.int8)
    cases[EXTREME] = (np.full((1, 64, 4, 4), 255, np.uint8), w, (1, 1), (0, 0, 0, 0), 0)
    return cases


def _requant(name, o):
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    mult, shift = intref.decompose_scale(np.exp2(rng.uniform(-14, -8, o)))
    bias = rng.integers(-2**12, 2**12, o).astype(np.int32)
    return Requant(bias, mult.astype(np.int32), shift.astype(np.int32), 7, 0, 255, "uint8")


def to_blocked(x: np.ndarray, zp: int) -> np.ndarray:
    n, c, h, w = x.shape
    cp = -(-c // 16) * 16
    full = np.full((n, cp, h, w), zp, np.uint8)
    full[:, :c] = x
    return np.ascontiguousarray(full.reshape(n, cp // 16, 16, h, w).transpose(0, 1, 3, 4, 2))


def from_blocked(y: np.ndarray) -> np.ndarray:
    n, cb, h, w, _ = y.shape
    return y.transpose(0, 1, 4, 2, 3).reshape(n, cb * 16, h, w)


def reference(x, w, strides, padding, zp, in_channels=None) -> np.ndarray:
    """The kernel's contract: the conv of x padded with zp (intref's centred conv + zp * sum(w)), the weight
    going through intref's own packing."""
    acc = intref.conv2d_int4(x, intref.pack_int4_conv(w, in_channels), w.shape, zp, strides, padding)
    return acc + zp * w.astype(np.int64).sum(axis=(1, 2, 3)).reshape(1, -1, 1, 1).astype(np.int32)


def _kernel_constants(func, prefix: str) -> list[np.ndarray]:
    """The constant arguments of the ``call_tir`` calls of ``func`` whose callee starts with ``prefix``."""
    import tvm
    from tvm import relax

    found = []

    def visit(e):
        if (isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir"
                and e.args[0].name_hint.startswith(prefix)):
            found.extend(a.value.numpy() for a in e.args[1].fields
                         if isinstance(a, tvm.ir.expr.Constant) and a.value.ndim == 7)

    relax.analysis.post_order_visit(func, visit)
    return found


# ---- no build ---------------------------------------------------------------
def test_pack_matches_intref_and_round_trips():
    for ws, in_channels in [((20, 24, 3, 3), None), ((16, 3, 3, 3), None), ((32, 12, 1, 1), None),
                            ((16, 32, 3, 3), None), ((20, 24, 3, 3), 32), ((7, 5, 1, 2), None)]:
        w = np.random.default_rng(sum(ws)).integers(-8, 8, ws).astype(np.int8)
        p = pack_int4_conv(w, 1, in_channels)
        assert p.dtype == np.uint8 and np.array_equal(p, intref.pack_int4_conv(w, in_channels))
        assert np.array_equal(intref.unpack_int4_conv(p, *ws, in_channels=in_channels), w)
        cp = in_channels or -(-ws[1] // 8) * 8
        assert p.size * 2 == -(-ws[0] // 16) * 16 * cp * ws[2] * ws[3]  # two weights a byte, padding included


def test_nibble_layout():
    """Byte [oc, ic, y, x, g, l, s]: low nibble w[16oc + l, b ic + 8g + s], high nibble the channel 4 above."""
    w = np.zeros((32, 24, 1, 1), np.int8)  # 24 channels: 8-channel blocks, ic = c // 8
    w[17, 9], w[17, 13] = -3, 5  # oc 1, lane 1; ic 1, g 0, s 1: the two nibbles of one byte
    p = pack_int4_conv(w)
    assert p.shape == (2, 3, 1, 1, 1, 16, 4)
    assert p[1, 1, 0, 0, 0, 1, 1] == (5 << 4) | (-3 & 0xF) and np.count_nonzero(p) == 1


def test_applicability_and_int32_bound():
    assert conv_int4_applicable((1, 24, 8, 8), (20, 24, 3, 3))
    assert conv_int4_applicable((1, 3, 8, 8), (16, 3, 3, 3))
    assert not conv_int4_applicable((1, 24, 8, 8), (24, 1, 3, 3), groups=24)  # depthwise: never
    assert not conv_int4_applicable((1, 32, 8, 8), (32, 4, 3, 3), groups=8)  # 4 channels a group: no byte pairs
    assert conv_int4_applicable((1, 32, 8, 8), (64, 8, 3, 3), groups=4)  # 8 in, 16 out a group
    c = MAX_K // 9 // 16 * 16  # K = C * KH * KW with C padded to 16
    assert conv_int4_applicable((1, c, 4, 4), (16, c, 3, 3))
    assert not conv_int4_applicable((1, c + 16, 4, 4), (16, c + 16, 3, 3))


def test_plans_pick_the_packed_conv_for_4bit_weights():
    """x86: a 4-bit conv -> the packed kernel, 8-bit, an RGB stem or past the int32 bound -> the int8 one,
    depthwise -> the depthwise kernel (int8 weights). AMX: its conv wrapper, 4-bit values in int8 on the tiles."""
    from types import SimpleNamespace

    from hago.backends.amx.plan import AMXPlan, _AmxConv
    from hago.backends.x86.plan import X86Plan, _Depthwise, _VnniConv, _VnniConvInt4
    from hago.qparams import QParams
    from hago.strategy import OpChoice

    def choice(bits, kind="conv2d", desc=None):
        return OpChoice(kind, "integer", descriptor=desc or {"weight_layout": "OIHW4i16o4i"}, weight_bits=bits)

    def node(groups):
        return SimpleNamespace(call=SimpleNamespace(attrs=SimpleNamespace(groups=groups)))

    qx = QParams(np.float32(0.1), np.int32(3), "uint8", 0, 255)
    x86, amx = X86Plan.__new__(X86Plan), AMXPlan.__new__(AMXPlan)
    xs, ws = [1, 24, 8, 8], (32, 24, 3, 3)
    assert type(x86.conv_kernel(node(1), choice(4), qx, xs, ws)) is _VnniConvInt4
    assert type(x86.conv_kernel(node(1), choice(8), qx, xs, ws)) is _VnniConv
    c = MAX_K // 9 // 16 * 16 + 16
    assert type(x86.conv_kernel(node(1), choice(4), qx, [1, c, 4, 4], (16, c, 3, 3))) is _VnniConv
    # an RGB stem: 3 channels pad to 8 packed vs 4 in int8, the same bytes for twice the MACs
    assert type(x86.conv_kernel(node(1), choice(4), qx, [1, 3, 8, 8], (16, 3, 3, 3))) is _VnniConv
    assert type(x86.conv_kernel(node(1), choice(4), qx, [1, 12, 8, 8], (16, 12, 3, 3))) is _VnniConvInt4
    dw = choice(4, "depthwise_conv2d", {"layout": "NCHW", "inputs": ["uint8", "int8"]})
    assert type(x86.conv_kernel(node(24), dw, qx, xs, (24, 1, 3, 3))) is _Depthwise
    # AMX: the tiles take 4-bit values in int8 (3x3 256->256 at 14x14: 91 us on AMX, 375 us packed VNNI);
    # a conv the tiles do not take runs the x86 plan's choice, the packed kernel
    amx4, amx8 = amx.conv_kernel(node(1), choice(4), qx, xs, ws), amx.conv_kernel(node(1), choice(8), qx, xs, ws)
    assert type(amx4) is _AmxConv and type(amx4.vnni) is _VnniConvInt4 and type(amx8.vnni) is _VnniConv


# ---- one build for the kernel cases -----------------------------------------
@pytest.fixture(scope="module")
def built():
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    cases = _all_cases()
    for name, (x_np, w_np, st, pad, zp) in cases.items():
        for suffix, emit in (("", emit_conv2d_vnni_int4), ("_int8", emit_conv2d_vnni)):
            x = relax.Var("x", relax.TensorType(x_np.shape, "uint8"))
            with bb.function(name + suffix, [x]):
                with bb.dataflow():
                    out = bb.emit_output(emit(bb, x, w_np, st, padding=pad, pad_value=zp))
                bb.emit_func_output(out)
    for name, (xs, ws, st, pad, zp) in BLOCKED_CASES.items():
        x_np, w_np = _data(name, xs, ws)
        cases[name] = (to_blocked(x_np, zp), w_np, st, pad, zp)
        for suffix, emit in (("", emit_conv2d_vnni_int4), ("_int8", emit_conv2d_vnni)):
            x = relax.Var("x", relax.TensorType(cases[name][0].shape, "uint8"))
            with bb.function(name + suffix, [x]):
                with bb.dataflow():
                    out = bb.emit_output(emit(bb, x, w_np, st, padding=pad, pad_value=zp,
                                              requant=_requant(name, ws[0]), out_layout="NCHW16c"))
                bb.emit_func_output(out)
    target = tvm.target.Target(TARGET)
    mod = schedule_vnni(bb.get(), target)
    return mod, tvm.compile(mod, target=target), cases


def _run(ex, name, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm[name](tvm.runtime.tensor(x)).numpy(), vm[name + "_int8"](tvm.runtime.tensor(x)).numpy()


@needs_vnni
@pytest.mark.llvm
@pytest.mark.parametrize("name", [*CASES, EXTREME])
def test_bit_exact_against_intref_and_int8_kernel(built, name):
    _, ex, cases = built
    x, w, st, pad, zp = cases[name]
    ref = reference(x, w, st, pad, zp)
    out, int8 = _run(ex, name, x)
    assert out.dtype == np.int32 and out.shape == ref.shape
    assert np.array_equal(out, ref)
    assert np.array_equal(out, int8)
    if name == EXTREME:
        assert np.abs(out).max() > 2**18


@needs_vnni
@pytest.mark.llvm
@pytest.mark.parametrize("name", list(BLOCKED_CASES))
def test_blocked_requantized_bit_exact(built, name):
    """Blocked in, requantized blocked out: the ``>> 4`` runs on the accumulator before the bias and the
    fixed-point multiply (shifting after the multiply would round differently)."""
    _, ex, cases = built
    xb, w, st, pad, zp = cases[name]
    o, c = w.shape[:2]
    rq = _requant(name, o)
    acc = reference(from_blocked(xb)[:, :c], w, st, pad, zp)
    ref = intref.requantize_fixed_point(acc.astype(np.int64) + rq.bias.reshape(1, -1, 1, 1), rq.multiplier,
                                        rq.shift, rq.zero_point, rq.qmin, rq.qmax, axis=1, out_dtype=np.uint8)
    out, int8 = _run(ex, name, xb)
    assert out.dtype == np.uint8 and np.array_equal(from_blocked(out)[:, :o], ref)
    assert np.array_equal(out, int8)
    assert len(np.unique(ref)) > 8  # the requantize spreads the values, not all clipped


@pytest.mark.llvm
def test_packed_constant_is_half_the_bytes(built):
    mod, _, cases = built
    for name, (_, w, *_rest) in cases.items():
        (packed,) = _kernel_constants(mod[name], "hago_conv2d_nchwc_int4_vnni")
        (int8,) = _kernel_constants(mod[name + "_int8"], "hago_conv2d_nchwc_vnni")
        assert packed.dtype == np.uint8 and int8.dtype == np.int8
        c = w.shape[1]
        if c % 8 == 0 or name.startswith("blk_"):  # both pad the channels to the same count
            assert 2 * packed.nbytes == int8.nbytes, name
        else:  # packed: channels padded to 8 (12 -> 16: 2/3 of the bytes), int8: to 4 (3 -> 4: no saving)
            assert 2 * packed.nbytes * -(-c // 4) * 4 == int8.nbytes * -(-c // 8) * 8, name


@needs_vnni
@pytest.mark.llvm
def test_schedule_and_assembly(built):
    import tvm

    mod, ex, _ = built
    kernels = {gv.name_hint: f for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith("hago_conv2d_nchwc_int4_vnni")}
    assert len(kernels) == len(CASES) + 1 + len(BLOCKED_CASES)
    assert all(f.attrs["tirx.is_scheduled"] for f in kernels.values())
    asm = ex.mod.imports[0].inspect_source("asm")
    assert len(re.findall(r"\bvpdpbusd\b", asm)) >= 2 * len(kernels)


# ---- realize: a small CNN at 4 bits ---------------------------------------------
def _cnn():
    """``conv 3x3 (3 -> 16) -> relu -> conv 3x3 s2 (16 -> 24) -> relu -> depthwise 3x3 -> relu -> conv 1x1
    (24 -> 20) -> global pool`` as a Relax module (static batch 2; built in Relax, not torch, for speed)."""
    from tvm import relax
    from tvm.relax import op as O

    rng = np.random.default_rng(0)

    def conv(y, o, c, k, stride=1, groups=1):
        w = rng.standard_normal((o, c, k, k)).astype(np.float32) / np.sqrt(c * k * k)
        y = O.nn.conv2d(y, relax.const(w), strides=stride, padding=k // 2, groups=groups)
        return O.add(y, relax.const(rng.standard_normal((1, o, 1, 1)).astype(np.float32) * 0.1))

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 12, 12), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(O.nn.relu(conv(x, 16, 3, 3)))
            y = bb.emit(O.nn.relu(conv(y, 24, 16, 3, stride=2)))
            y = bb.emit(O.nn.relu(conv(y, 24, 1, 3, groups=24)))
            y = bb.emit(conv(y, 20, 24, 1))
            y = bb.emit_output(O.mean(y, axis=[2, 3]))
        bb.emit_func_output(y)
    return bb.get()


@needs_vnni
def test_realized_cnn_packs_4bit_convs_bit_exact(monkeypatch):
    """At 4 bits on x86-avx512-vnni the two convs with more than 4 input channels run the packed kernel (uint8
    weights, half the int8 kernel's bytes); the RGB stem and the depthwise conv keep int8 weights. The build
    equals the same strategy realized with the int8 conv kernel on the same integer weights, exactly."""
    import tvm
    from tvm import relax

    from hago.annotate import AnnotateConfig
    from hago.backends.x86 import kernels
    from hago.build import build
    from hago.compiler import quantize
    from hago.hwspec import HardwareSpec
    from hago.pipeline import lower

    x = np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)
    spec = HardwareSpec.load("x86-avx512-vnni")
    q = quantize(_cnn(), spec, {"x": x}, calibrator="minmax", annotate_config=AnnotateConfig(weight_bits=4))
    convs = [c for c in q.strategy.ops.values() if c.kind in ("conv2d", "depthwise_conv2d")]
    assert len(convs) == 4 and all(c.mode == "integer" and c.weight_bits == 4 for c in convs)

    int4_mod = q.realized.mod
    monkeypatch.setattr(kernels, "conv_int4_applicable", lambda *a: False)  # the int8 kernel, same weights
    int8_mod = lower(q.prepared, q.strategy, spec, 2)[1].mod
    packed = _kernel_constants(int4_mod["main"], "hago_conv2d_nchwc_int4_vnni")
    int8 = _kernel_constants(int8_mod["main"], "hago_conv2d_nchwc_vnni")
    assert len(packed) == 2 and len(int8) == 3 and all(p.dtype == np.uint8 for p in packed)
    assert sum(p.nbytes for p in packed) * 2 == sum(w.nbytes for w in int8[1:])  # the stem stays int8

    target = tvm.target.Target(spec.target)
    outs = [relax.VirtualMachine(build(m, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
            for m in (int4_mod, int8_mod)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(outs[0]).max() > 0
