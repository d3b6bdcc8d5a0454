"""AMX bf16 implicit-GEMM conv2d (``hago.backends.amx.conv``): numbers, tiling, and the legalization contract.

The kernels are compared with a float64 torch conv of the bf16-rounded
inputs (``ml_dtypes``, nearest even). bf16 products are exact in fp32, so the
kernel differs only in the order and fp32 rounding of its sums: the
tolerance is ``RTOL * conv(|x|, |w|)`` (+ ``|bias|``) per output with ``RTOL
= 1e-5`` (measured below 1e-7). A wrong tap, channel or pixel misses by about
one product, ~1/(C*KH*KW) of that scale or more.

Every case is an output of one Relax module built by hago's x86 backend, the
convs legalized the way the backend will do it (``LegalizeOps`` with
:func:`legalize_conv2d_amx_bf16`), so the file pays one build.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from hago.backends.amx.conv import (ConvGeometry, blocked_weight_to_oihw, conv2d_amx_bf16_applicable,
                                    emit_conv2d_amx_bf16, geometry, legalize_conv2d_amx_bf16, needs_pack,
                                    pack_conv_weight, pixel_tiles)
from hago.backends.amx.permission import amx_available

AMX_MISSING = amx_available()  # also asks Linux for the permission this process needs to run the kernels
needs_amx = pytest.mark.skipif(AMX_MISSING is not None, reason=AMX_MISSING or "")

TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    c: int
    hw: tuple[int, int]
    o: int
    k: int
    stride: int
    padding: tuple[int, ...]
    ib: int
    ob: int
    in_dtype: str = "float32"  # the conv's data: astype(fp32 input, bf16), or a bf16 input as it is
    bias: bool = False  # through emit_conv2d_amx_bf16 (the legalization takes none)
    mode: str | None = None  # forced tiling mode (through emit_conv2d_amx_bf16)


CASES = {
    "resnet18_3x3_64_56x56": Case(1, 64, (56, 56), 64, 3, 1, (1, 1), 16, 16),
    "3x3_s2_64_to_128": Case(1, 64, (28, 28), 128, 3, 2, (1, 1), 16, 16),
    "1x1_ib16_144_to_24_ob8": Case(1, 144, (28, 28), 24, 1, 1, (0, 0), 16, 8),
    "1x1_ib32_bf16_in_o48": Case(2, 64, (14, 14), 48, 1, 1, (0, 0), 32, 16, in_dtype="bfloat16"),
    "1x1_s2": Case(1, 64, (14, 14), 32, 1, 2, (0, 0), 16, 16),
    "5x5_pad2": Case(1, 32, (14, 14), 32, 5, 1, (2, 2), 16, 16),
    "ow7_3x3_image_tiles": Case(1, 128, (7, 7), 64, 3, 1, (1, 1), 16, 16),
    "ow7_3x3_row_tiles_bias": Case(1, 128, (7, 7), 64, 3, 1, (1, 1), 16, 16, bias=True, mode="rows"),
    "ow14_3x3": Case(1, 64, (14, 14), 64, 3, 1, (1, 1), 16, 16),
    "c24_ib8": Case(1, 24, (20, 20), 32, 3, 1, (1, 1), 8, 16),
    "o48_3_blocks_bias": Case(1, 32, (10, 10), 48, 3, 1, (1, 1), 16, 16, bias=True),
    "ragged_ob4_asym_pad": Case(2, 16, (9, 17), 20, 3, 2, (0, 1, 1, 0), 16, 4),
    "image_tiles_ob8_bias": Case(1, 16, (6, 11), 40, 3, 1, (1, 1), 16, 8, bias=True, mode="image"),
}


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)))


def _data(name: str, case: Case):
    rng = _rng(name)
    x = rng.standard_normal((case.n, case.c // case.ib, *case.hw, case.ib)).astype(np.float32)
    w = rng.standard_normal((case.o // case.ob, case.c // case.ib, case.k, case.k, case.ib, case.ob))
    bias = rng.standard_normal(case.o).astype(np.float32) if case.bias else None
    return x, w.astype(ml_dtypes.bfloat16), bias


def _conv(relax, xb, w, case: Case):
    import tvm

    return relax.op.nn.conv2d(xb, relax.const(tvm.runtime.tensor(w)), strides=(case.stride,) * 2,
                              padding=case.padding, data_layout=f"NCHW{case.ib}c",
                              kernel_layout=f"OIHW{case.ib}i{case.ob}o", out_layout=f"NCHW{case.ob}c",
                              out_dtype="float32")


@pytest.fixture(scope="module")
def run():
    """Build all cases in one module (legalized by LegalizeOps, or emitted), run them: (results, inputs, executable)."""
    import tvm
    from tvm import relax

    from hago.backends.registry import get_backend

    inputs = {name: _data(name, case) for name, case in CASES.items()}
    bb = relax.BlockBuilder()
    xs = {name: relax.Var(f"x{i}", relax.TensorType(inputs[name][0].shape, case.in_dtype))
          for i, (name, case) in enumerate(CASES.items())}
    with bb.function("main", list(xs.values())):
        with bb.dataflow():
            outs = []
            for name, case in CASES.items():
                x, w, bias = inputs[name]
                if case.bias or case.mode:  # the emitter, with what the legalization does not take
                    g = dataclasses.replace(geometry(x.shape, w.shape, (case.stride,) * 2, case.padding),
                                            force_mode=case.mode)
                    outs.append(emit_conv2d_amx_bf16(bb, xs[name], blocked_weight_to_oihw(w), g, bias=bias))
                else:
                    xb = xs[name] if case.in_dtype == "bfloat16" else bb.emit(relax.op.astype(xs[name], "bfloat16"))
                    outs.append(bb.emit(_conv(relax, xb, w, case)))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)

    def legalize(block_builder, call):
        out = legalize_conv2d_amx_bf16(block_builder, call)
        assert out is not None, "every conv2d here is one the AMX kernel takes"
        return out

    mod = relax.transform.LegalizeOps({"relax.nn.conv2d": legalize})(bb.get())
    target = tvm.target.Target(TARGET)
    with target:
        ex = get_backend("x86").build(mod, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(inputs[name][0].astype(ml_dtypes.bfloat16) if case.in_dtype == "bfloat16"
                               else inputs[name][0]) for name, case in CASES.items()]
    results = vm["main"](*args)
    return {name: results[i].numpy() for i, name in enumerate(CASES)}, inputs, ex


def _reference(x: np.ndarray, w_oihw: np.ndarray, bias, case: Case, rounded: bool = True):
    """float64 conv of the (bf16-rounded) inputs in NCHW{ob}c, and the scale ``conv(|x|, |w|) + |bias|``."""
    import torch

    n, cblocks, h, w, ib = x.shape
    xr = (x.astype(ml_dtypes.bfloat16) if rounded else x).astype(np.float64)
    xr = xr.transpose(0, 1, 4, 2, 3).reshape(n, cblocks * ib, h, w)
    pad = case.padding * 2 if len(case.padding) == 2 else case.padding  # (top, left, bottom, right)

    def conv(a, b):
        a = torch.nn.functional.pad(torch.from_numpy(a), (pad[1], pad[3], pad[0], pad[2]))
        return torch.nn.functional.conv2d(a, torch.from_numpy(b), stride=case.stride).numpy()

    wr = w_oihw.astype(np.float64)
    ref, scale = conv(xr, wr), conv(np.abs(xr), np.abs(wr))
    if bias is not None:
        ref, scale = ref + bias[:, None, None], scale + np.abs(bias)[:, None, None]
    nb, o, oh, ow = ref.shape

    def blocked(a):
        return a.reshape(nb, o // case.ob, case.ob, oh, ow).transpose(0, 1, 3, 4, 2)

    return blocked(ref), blocked(scale)


# ---- no AMX needed ---------------------------------------------------------------------
def test_pixel_tiles_fewest_tiles_then_fewest_rows():
    assert pixel_tiles(56) == (14, 4) and pixel_tiles(112) == (16, 7) and pixel_tiles(7) == (7, 1)
    assert pixel_tiles(17) == (9, 2)  # the second tile starts at 8: one row computed twice
    assert pixel_tiles(61) == (16, 4)  # a 3x3 conv on 7 x 7 across the padded image (6 * 9 + 7 rows)


def test_tiling_mode_choice():
    def g(h, k, s, p, o=64, ob=16):
        return ConvGeometry(1, 64, h, h, o, k, k, (s, s), (p,) * 4, 16, ob)

    assert g(56, 3, 1, 1).mode == "rows" and g(56, 3, 1, 1).direct  # 4 full-width tiles a row
    assert g(7, 3, 1, 1).mode == "image" and not g(7, 3, 1, 1).direct  # 4 tiles instead of 7
    assert g(7, 3, 2, 1).mode == "rows"  # stride 2: every other padded column would be computed
    one = g(14, 1, 1, 0)
    assert one.mode == "image" and one.direct and one.tiling() == (16, 13)  # a plain GEMM over 196 pixels
    assert not g(14, 1, 1, 0, o=24, ob=8).direct  # NCHW8c goes through the tile buffer


def test_weight_packing_is_the_tile_order():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 40, 3, 3)).astype(np.float32)
    p = pack_conv_weight(w)
    assert p.dtype == ml_dtypes.bfloat16 and p.shape == (2, 2, 3, 3, 16, 16, 2)  # O 20 -> 32, C 40 -> 64
    o, c, kh, kw = 17, 35, 2, 1
    assert p[o // 16, c // 32, kh, kw, (c % 32) // 2, o % 16, c % 2] == w[o, c, kh, kw].astype(ml_dtypes.bfloat16)
    assert not p[1, :, :, :, :, 4:].astype(np.float32).any() and not p[:, 1, :, :, 4:].astype(np.float32).any()
    blocked = w.reshape(20 // 4, 4, 40 // 8, 8, 3, 3).transpose(0, 2, 4, 5, 3, 1)  # OIHW8i4o
    np.testing.assert_array_equal(blocked_weight_to_oihw(blocked), w)


def test_applicability():
    data, weight = (1, 4, 56, 56, 16), (4, 4, 3, 3, 16, 16)
    assert conv2d_amx_bf16_applicable(data, weight, (1, 1), (1, 1), (1, 1), 1)
    assert conv2d_amx_bf16_applicable(data, weight, (2, 2), (0, 1, 1, 0), (1, 1), 1)
    assert not conv2d_amx_bf16_applicable(data, weight, (1, 1), (1, 1), (2, 2), 1)  # dilation
    assert not conv2d_amx_bf16_applicable(data, weight, (1, 1), (1, 1), (1, 1), 2)  # groups
    assert not conv2d_amx_bf16_applicable((1, 1, 224, 224, 3), (4, 1, 7, 7, 3, 16), (2, 2), (3, 3), (1, 1), 1)
    assert not conv2d_amx_bf16_applicable(data, (4, 4, 3, 3, 16, 32), (1, 1), (1, 1), (1, 1), 1)  # ob 32
    assert not conv2d_amx_bf16_applicable(("n", 4, 56, 56, 16), weight, (1, 1), (1, 1), (1, 1), 1)  # symbolic
    assert not conv2d_amx_bf16_applicable((1, 4, 2, 2, 16), weight, (1, 1), (0, 0), (1, 1), 1)  # kernel > input
    assert not needs_pack(geometry((1, 2, 7, 7, 32), (4, 2, 1, 1, 32, 16), (1, 1), (0, 0)), "bfloat16")
    assert needs_pack(geometry((1, 2, 7, 7, 32), (4, 2, 1, 1, 32, 16), (1, 1), (0, 0)), "float32")


def test_legalization_declines_what_it_cannot_run():
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 14, 14, 16), "bfloat16"))
    xn = relax.Var("xn", relax.TensorType((1, 64, 14, 14), "bfloat16"))
    wv = relax.Var("w", relax.TensorType((4, 4, 3, 3, 16, 16), "bfloat16"))
    w = relax.const(tvm.runtime.tensor(np.zeros((4, 4, 3, 3, 16, 16), ml_dtypes.bfloat16)))
    wn = relax.const(tvm.runtime.tensor(np.zeros((64, 64, 3, 3), ml_dtypes.bfloat16)))
    blocked = dict(data_layout="NCHW16c", kernel_layout="OIHW16i16o", out_layout="NCHW16c", out_dtype="float32")
    with bb.function("main", [x, xn, wv]):
        declined = [
            relax.op.nn.conv2d(x, w, padding=(2, 2), dilation=(2, 2), **blocked),  # dilation 2
            relax.op.nn.conv2d(x, wv, padding=(1, 1), **blocked),  # weight not a constant
            relax.op.nn.conv2d(xn, wn, padding=(1, 1), out_dtype="float32"),  # plain NCHW
        ]
        for call in declined:
            assert legalize_conv2d_amx_bf16(bb, bb.normalize(call)) is None
        bb.emit_func_output(x)


def _legalized_calls(x_dtype: str, padding, astype: bool):
    """Legalize one 1x1 conv on a ``NCHW16c`` input; the ``call_tir`` callees and first args it emitted."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 7, 7, 16), x_dtype))
    w = relax.const(tvm.runtime.tensor(np.ones((2, 2, 1, 1, 16, 16), ml_dtypes.bfloat16)))
    with bb.function("main", [x]):
        with bb.dataflow():
            xb = bb.emit(relax.op.astype(x, "bfloat16")) if astype else x
            call = bb.normalize(relax.op.nn.conv2d(xb, w, padding=padding, data_layout="NCHW16c",
                                                   kernel_layout="OIHW16i16o", out_layout="NCHW16c",
                                                   out_dtype="float32"))
            out = bb.emit_output(legalize_conv2d_amx_bf16(bb, call, threads=2))
        bb.emit_func_output(out)
    mod = bb.get()
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", "") == "relax.call_tir" else None)
    return x, [(c.args[0].name_hint, c.args[1][0]) for c in calls]


def test_bf16_nchw16c_without_padding_is_read_in_place():
    x, calls = _legalized_calls("bfloat16", (0, 0), astype=False)
    assert [name for name, _ in calls] == ["hago_conv2d_amx_bf16"] and calls[0][1].same_as(x)
    x, calls = _legalized_calls("bfloat16", (1, 1), astype=False)  # padding: a packed copy
    assert [name for name, _ in calls] == ["hago_pack_amx_conv", "hago_conv2d_amx_bf16"]
    # astype(fp32 x, bf16) right before a padded conv: the pack it needs anyway reads x and rounds it itself
    x, calls = _legalized_calls("float32", (1, 1), astype=True)
    assert [name for name, _ in calls] == ["hago_pack_amx_conv", "hago_conv2d_amx_bf16"] and calls[0][1].same_as(x)
    # before an unpadded one the conv reads the cast's bf16 blocks in place (a pack over fp32 would be a pass more
    # than the cast, which its producer's pass absorbs; docs/STATUS.md, session 21)
    x, calls = _legalized_calls("float32", (0, 0), astype=True)
    assert [name for name, _ in calls] == ["hago_conv2d_amx_bf16"] and not calls[0][1].same_as(x)


# ---- AMX -------------------------------------------------------------------------------------
@needs_amx
@pytest.mark.parametrize("name", list(CASES))
def test_conv_matches_rounded_reference(run, name):
    results, inputs, _ = run
    case = CASES[name]
    x, w, bias = inputs[name]
    ref, scale = _reference(x, blocked_weight_to_oihw(w).astype(np.float64), bias, case)
    got = results[name]
    assert got.dtype == np.float32 and got.shape == ref.shape
    err = np.abs(got - ref) / scale
    assert err.max() < RTOL, f"{name}: max relative error {err.max():.3g}"


@needs_amx
def test_input_really_rounded_to_bf16(run):
    """The unrounded fp32 input's conv is further from the kernel than the tolerance: the pack rounds."""
    results, inputs, _ = run
    name = "resnet18_3x3_64_56x56"
    x, w, _ = inputs[name]
    ref, scale = _reference(x, blocked_weight_to_oihw(w).astype(np.float64), None, CASES[name], rounded=False)
    assert (np.abs(results[name] - ref) / scale).max() > 10 * RTOL


@needs_amx
def test_assembly_has_tile_instructions(run):
    asm = run[2].mod.imports[0].inspect_source("asm")
    for needed in ("tdpbf16ps", "tileloadd", "tilestored", "ldtilecfg", "tilerelease"):
        assert needed in asm, f"{needed} missing from the build"
    assert "hago_amx_conv_bf16" not in asm.replace(".Lhago", "")  # the micro-kernels are inlined


@needs_amx
@pytest.mark.parametrize("name", ["resnet18_3x3_64_56x56", "image_tiles_ob8_bias", "3x3_s2_64_to_128",
                                  "1x1_ib32_bf16_in_o48", "1x1_ib16_144_to_24_ob8"])
def test_residual_and_two_outputs_on_the_stored_tiles(name):
    """``residual=`` adds a skip tensor after the bias and before the clamp, ``out_dtype=("float32",
    "bfloat16")`` writes that value and its bf16 cast from one kernel: bit for bit the bias-less kernel's output
    with the bias, the add and the clamp done after it, and its nearest-even cast (16- and 8-channel output blocks, the
    direct and the image tilings). The bias is then the epilogue's first add, as in the unfused program."""
    import tvm
    from tvm import relax

    from hago.backends.registry import get_backend

    case = CASES[name]
    x, w, _ = _data(name, case)
    rng = _rng("skip-" + name)
    bias = rng.standard_normal(case.o).astype(np.float32)
    g = geometry(x.shape, w.shape, (case.stride,) * 2, case.padding)
    skip = rng.standard_normal((case.n, case.o // case.ob, g.oh, g.ow, case.ob)).astype(np.float32)
    w_oihw, clip = blocked_weight_to_oihw(w), (0.0, 6.0)
    bb = relax.BlockBuilder()
    xv, rv = relax.Var("x", relax.TensorType(x.shape, "float32")), relax.Var("r", relax.TensorType(skip.shape,
                                                                                                   "float32"))
    with bb.function("main", [xv, rv]):
        with bb.dataflow():
            plain = emit_conv2d_amx_bf16(bb, xv, w_oihw, g)
            fused = emit_conv2d_amx_bf16(bb, xv, w_oihw, g, bias=bias, clip=clip, out_dtype=("float32", "bfloat16"),
                                         residual=rv)
            out = bb.emit_output(relax.Tuple([plain, fused]))
        bb.emit_func_output(out)
    mod = bb.get()
    kernels = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("hago_conv2d_amx_bf16")]
    assert sorted(len(f.params) for f in kernels) == [3, 6]  # (X, W, Out) and (X, W, bias, R, Out, Out_bf16)
    target = tvm.target.Target(TARGET)
    with target:
        ex = get_backend("x86").build(mod, target)
    plain, (fp32, bf) = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(skip))
    summed = plain.numpy() + bias.reshape(1, -1, 1, 1, case.ob) + skip  # float32, in the unfused program's order
    want = np.minimum(np.maximum(summed, np.float32(clip[0])), np.float32(clip[1]))
    fp32, bf = fp32.numpy(), bf.numpy()
    assert str(bf.dtype) == "bfloat16" and bf.shape == fp32.shape == want.shape
    np.testing.assert_array_equal(fp32, want)
    np.testing.assert_array_equal(bf.view(np.uint16), want.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert 0 < np.count_nonzero(want < 6.0) < want.size and np.count_nonzero(want == 6.0) > 0  # the clamp ran
