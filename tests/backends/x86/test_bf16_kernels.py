"""bf16 kernels (``vdpbf16ps``): against a numpy bf16 reference, and ``vdpbf16ps`` in the build.

The reference rounds the fp32 inputs and weights to bf16 (nearest even, with
``ml_dtypes``) and sums the products in float64. The products of bf16 values
are exact in fp32, so the kernel differs from it only by the order and the
fp32 rounding of its additions: the tolerance is ``RTOL * sum|x*w|`` per
output (plus ``|bias|``). A worst case bound would be ``K * 2**-24`` of that
sum, but rounding errors of a long sum grow like ``sqrt(K) * 2**-24`` (at most
~2.3e-6 for K = 1536 here; measured: below 2e-7 on every case), so
``RTOL = 1e-5``. A wrong weight layout, channel or padding misses by at least
one product, ``~1/K`` of the sum (>= 6e-4 here). The rounding itself is checked
bit for bit (``d_rne_identity``: ties to even through the real kernel).

All cases go into one Relax module so the file pays one ``tvm.compile``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from hago.backends.x86.bf16 import (
    CAST_EPILOGUE,
    bf16_applicable,
    emit_conv2d_bf16,
    emit_dense_bf16,
    pack_conv_weight,
    pack_dense_weight,
)
from hago.backends.x86.schedules import has_bf16, schedule_vnni


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


pytestmark = pytest.mark.skipif("avx512_bf16" not in _cpu_flags(), reason="CPU lacks avx512_bf16")

TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
RTOL = 1e-5

# name -> (x shape, w shape [K, N], bias)
DENSE = {
    "d_1x384x384": ((1, 384), (384, 384), True),
    "d_128x384x1536": ((128, 384), (384, 1536), False),
    "d_odd_7x31x20": ((7, 31), (31, 20), True),  # K odd, N % 16 and M ragged
    "d_batched_2x3x64x40": ((2, 3, 64), (64, 40), False),
}
# name -> (x shape NCHW, w shape OIHW, strides, padding (t, l, b, r), dilation, groups, bias)
CONV = {
    "c_rgb_3x3_s2": ((1, 3, 17, 17), (24, 3, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, True),  # C 3 -> 4, O 24 -> 32
    "c_3x3_b2": ((2, 32, 12, 12), (48, 32, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, False),
    "c_1x1_40_24": ((2, 40, 9, 9), (24, 40, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, True),  # block 8
    "c_1x1_s2": ((1, 64, 14, 14), (128, 64, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, False),
    "c_5x5": ((1, 16, 12, 12), (32, 16, 5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1, True),
    "c_5x5_s2_asym": ((1, 6, 15, 15), (16, 6, 5, 5), (2, 2), (1, 2, 2, 1), (1, 1), 1, False),  # block 2
    "c_dil2": ((1, 24, 11, 11), (16, 24, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1, False),
    "c_groups4": ((1, 32, 9, 9), (64, 8, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, True),
    "c_groups2_s2": ((1, 12, 10, 10), (32, 6, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 2, False),
}
# blocked layouts, as the build's float layout pass gives them: name -> (case above, input block (None: NCHW),
# output block (None: NCHW), output dtype, clip, with a residual added in the write-back)
BLOCKED = {
    "b_in_out_3x3": ("c_3x3_b2", 16, 16, "float32", None, False),
    "b_out_rgb": ("c_rgb_3x3_s2", None, 8, "float32", None, False),  # 24 channels: NCHW8c from 16-lane tiles
    "b_in_rgb_stem_relu6_bf16": ("c_rgb_3x3_s2", 3, 8, "bfloat16", (0.0, 6.0), False),  # NCHW3c widened to 4
    "b_in_8_1x1_out_8": ("c_1x1_40_24", 8, 8, "float32", None, False),
    "b_in_8_1x1_out_8_residual_relu": ("c_1x1_40_24", 8, 8, "float32", (0.0, None), True),
    "b_in_8_1x1_nchw": ("c_1x1_40_24", 8, None, "float32", None, False),
    "b_5x5_relu_bf16": ("c_5x5", 16, 16, "bfloat16", (0.0, None), False),
    "b_3x3_residual_relu6_bf16": ("c_3x3_b2", 16, 16, "bfloat16", (0.0, 6.0), True),
}


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)))


def _round(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bf16 (nearest even), back in float64."""
    return a.astype(ml_dtypes.bfloat16).astype(np.float64)


def np_conv2d(x, w, strides, padding, dilation, groups) -> np.ndarray:
    """im2col + einsum in float64, per group."""
    t, l, b, r = padding
    x = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h - (kh - 1) * dh - 1) // sh + 1, (wd - (kw - 1) * dw - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), np.float64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
    og = o // groups
    out = [np.einsum("nckhxy,ockh->noxy", cols[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og]) for g in range(groups)]
    return np.concatenate(out, axis=1)


def to_blocked(x: np.ndarray, block: int = 16) -> np.ndarray:
    """NCHW -> NCHW{block}c, channels zero-padded to the block."""
    n, c, h, w = x.shape
    cp = -(-c // block) * block
    xp = np.zeros((n, cp, h, w), x.dtype)
    xp[:, :c] = x
    return np.ascontiguousarray(xp.reshape(n, cp // block, block, h, w).transpose(0, 1, 3, 4, 2))


def from_blocked(x: np.ndarray, channels: int) -> np.ndarray:
    n, cb, h, w, lanes = x.shape
    return x.transpose(0, 1, 4, 2, 3).reshape(n, cb * lanes, h, w)[:, :channels]


# ---- no build needed ------------------------------------------------------
def test_pack_dense_weight_layout_and_rounding():
    w = _rng("pack").standard_normal((31, 20)).astype(np.float32)
    p = pack_dense_weight(w)
    assert p.shape == (2, 16, 16, 2) and p.dtype == ml_dtypes.bfloat16
    k, n = np.meshgrid(np.arange(31), np.arange(20), indexing="ij")
    assert np.array_equal(p[n // 16, k // 2, n % 16, k % 2].astype(np.float64), _round(w))
    assert not p[1, :, 4:].astype(np.float32).any() and not p[:, 15, :, 1].astype(np.float32).any()  # zero padding


def test_pack_conv_weight_layout():
    w = _rng("packc").standard_normal((20, 24, 3, 3)).astype(np.float32)
    p = pack_conv_weight(w)  # 24 input channels -> block 8
    assert p.shape == (2, 3, 3, 3, 4, 16, 2)
    o, i = np.meshgrid(np.arange(20), np.arange(24), indexing="ij")
    assert np.array_equal(p[o // 16, i // 8, 1, 2, (i % 8) // 2, o % 16, i % 2].astype(np.float64),
                          _round(w[:, :, 1, 2]))
    assert not p[1, :, :, :, :, 4:].astype(np.float32).any()


def test_bf16_applicable():
    assert bf16_applicable("dense", (8, 31), (31, 20))
    assert not bf16_applicable("dense", (8, 31), (30, 20))
    assert bf16_applicable("conv2d", (1, 3, 8, 8), (16, 3, 3, 3))
    assert bf16_applicable("conv2d", (1, 12, 8, 8), (32, 6, 3, 3), groups=2)
    assert not bf16_applicable("conv2d", (1, 32, 8, 8), (32, 1, 3, 3), groups=32)  # depthwise stays fp32
    assert not bf16_applicable("conv2d", (1, 12, 8, 8), (32, 3, 3, 3), groups=4)  # odd inputs per group
    assert not bf16_applicable("conv2d", (1, 32, 8, 8), (40, 8, 3, 3), groups=4)  # 10 outputs per group
    assert not bf16_applicable("conv2d", ("n", 32, 8, 8), (16, 32, 3, 3))  # dynamic batch


def test_has_bf16_follows_the_cpu_model():
    import tvm

    def cpu(mcpu):
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu})

    assert has_bf16(cpu("sapphirerapids")) and has_bf16(cpu("cooperlake")) and has_bf16(cpu("znver4"))
    assert not has_bf16(cpu("cascadelake")) and not has_bf16(cpu("skylake-avx512"))
    assert not has_bf16(tvm.target.Target({"kind": "llvm"}))


# ---- one build for all kernels --------------------------------------------
def _function(bb, name, x_np, emit):
    from tvm import relax

    x = relax.Var("x", relax.TensorType(x_np.shape, str(x_np.dtype)))
    with bb.function(name, [x]):
        with bb.dataflow():
            out = bb.emit_output(emit(x))
        bb.emit_func_output(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    cases = {}  # name -> (x, reference, tolerance per output, output transform)
    for name, (xs, ws, with_bias) in DENSE.items():
        rng = _rng(name)
        x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
        bias = rng.standard_normal(ws[1]).astype(np.float32) if with_bias else None
        _function(bb, name, x, lambda v: emit_dense_bf16(bb, v, w, bias))
        ref = _round(x) @ _round(w) + (0 if bias is None else bias)
        scale = np.abs(_round(x)) @ np.abs(_round(w)) + (0 if bias is None else np.abs(bias))
        cases[name] = (x, ref, RTOL * scale, None)
    # ties: every input halfway between two bf16 values, through an identity weight (exact products and sums)
    bits = _rng("rne").integers(0x3F000000, 0x41000000, (3, 64), dtype=np.uint32)
    x = ((bits & 0xFFFF0000) | 0x8000).view(np.float32)
    x[0, :4] = [0.1, -0.1, 1.00390625, 1.01171875]  # non-ties; 1 + 2**-8 rounds down to 1, 1 + 3 * 2**-8 up
    _function(bb, "d_rne_identity", x, lambda v: emit_dense_bf16(bb, v, np.eye(64, dtype=np.float32)))
    cases["d_rne_identity"] = (x, x.astype(ml_dtypes.bfloat16).astype(np.float32), 0.0, None)
    for name, (xs, ws, strides, padding, dilation, groups, with_bias) in CONV.items():
        rng = _rng(name)
        x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
        bias = rng.standard_normal(ws[0]).astype(np.float32) if with_bias else None
        _function(bb, name, x, lambda v: emit_conv2d_bf16(bb, v, w, strides, dilation, groups, padding, bias))
        ref = np_conv2d(_round(x), _round(w), strides, padding, dilation, groups)
        scale = np_conv2d(np.abs(_round(x)), np.abs(_round(w)), strides, padding, dilation, groups)
        if bias is not None:
            ref, scale = ref + bias[:, None, None], scale + np.abs(bias)[:, None, None]
        cases[name] = (x, ref, RTOL * scale, None)
        for bname, (case, in_block, out_block, out_dtype, clip, with_residual) in BLOCKED.items():
            if case != name:
                continue
            xb = to_blocked(x, in_block) if in_block else x
            layout = "NCHW16c" if out_block else "NCHW"
            skip = _rng(bname).standard_normal(ref.shape).astype(np.float32) if with_residual else None
            res = None if skip is None else relax.const(to_blocked(skip, out_block))
            _function(bb, bname, xb, lambda v: emit_conv2d_bf16(
                bb, v, w, strides, dilation, groups, padding, bias, out_layout=layout, clip=clip, out_dtype=out_dtype,
                out_block=out_block or 16, residual=res))
            r = ref if skip is None else ref + skip
            if clip:
                r = np.clip(r, -np.inf if clip[0] is None else clip[0], np.inf if clip[1] is None else clip[1])
            tol = RTOL * scale
            if out_dtype == "bfloat16":  # the write-back rounds to bf16: half a bf16 step more
                r, tol = _round(r), tol + np.abs(r) * 2.0 ** -8
            cases[bname] = (xb, r, tol, (lambda o, c=ws[0]: from_blocked(o.astype(np.float32), c)) if out_block
                            else None)
    target = tvm.target.Target(TARGET)
    mod = schedule_vnni(bb.get(), target)
    ex = tvm.compile(mod, target=target)
    so = tmp_path_factory.mktemp("bf16") / "kernels.so"
    ex.export_library(str(so))
    return mod, ex, so, cases


@pytest.mark.llvm
@pytest.mark.parametrize("name", [*DENSE, "d_rne_identity", *CONV, *BLOCKED])
def test_matches_bf16_reference(built, name):
    import tvm
    from tvm import relax

    _, ex, _, cases = built
    x, ref, tol, unblock = cases[name]
    out = relax.VirtualMachine(ex, tvm.cpu())[name](tvm.runtime.tensor(x)).numpy()
    want = BLOCKED[name][3] if name in BLOCKED else "float32"
    assert str(out.dtype) == want
    if unblock is not None:
        block = BLOCKED[name][2]
        assert out.ndim == 5 and out.shape[-1] == block
        padded = from_blocked(out.astype(np.float32), out.shape[1] * block)[:, ref.shape[1]:]
        assert not padded.any(), "padded output channels must be 0"
        out = unblock(out)
    assert out.shape == ref.shape
    assert np.isfinite(ref).all() and np.isfinite(tol).all()  # a reference or tolerance that cannot fail
    err = np.abs(out - ref)
    assert np.all(err <= tol), f"max error {err.max():.3g}, {(err / np.maximum(tol, 1e-30)).max():.3g}x the tolerance"


@pytest.mark.llvm
def test_every_kernel_is_scheduled(built):
    import tvm

    kernels = {gv.name_hint: f for gv, f in built[0].functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    names = set(kernels)
    for prefix in ("hago_dense_bf16", "hago_to_bf16", "hago_conv2d_nchwc_bf16", "hago_nchw_to_nchwc_bf16",
                   "hago_nchwc_to_nchw_f32", "hago_pad_nchwc_bf16"):
        assert any(n.startswith(prefix) for n in names), prefix
    for name, f in kernels.items():
        assert f.attrs and f.attrs.get("tirx.is_scheduled"), name


@pytest.mark.llvm
def test_assembly_has_vdpbf16ps_and_no_shim_calls(built):
    asm = built[1].mod.imports[0].inspect_source("asm")
    assert len(re.findall(r"\bvdpbf16ps\b", asm)) >= len(DENSE) + len(CONV) + len(BLOCKED)
    assert not re.search(r"call\w*\s+\S*hago_dpbf16ps", asm), "the vdpbf16ps shim must be inlined"


@pytest.mark.llvm
def test_exported_library_has_vdpbf16ps_and_runs(built):
    import tvm
    from tvm import relax

    so, cases = built[2], built[3]
    dis = subprocess.run(["objdump", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    assert "vdpbf16ps" in dis and "hago_dpbf16ps" not in dis
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())
    x, ref, tol, _ = cases["c_3x3_b2"]
    assert np.all(np.abs(vm["c_3x3_b2"](tvm.runtime.tensor(x)).numpy() - ref) <= tol)


@pytest.mark.llvm
def test_target_without_bf16_keeps_naive_correct_kernels():
    """Cascade Lake has no vdpbf16ps: the bf16 kernels stay unscheduled (TVM computes them in fp32), still right."""
    import tvm
    from tvm import relax

    rng = _rng("clx")
    x, w = rng.standard_normal((5, 31)).astype(np.float32), rng.standard_normal((31, 20)).astype(np.float32)
    bb = relax.BlockBuilder()
    _function(bb, "main", x, lambda v: emit_dense_bf16(bb, v, w))
    clx = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    mod = schedule_vnni(bb.get(), clx)
    dense = next(f for gv, f in mod.functions_items() if gv.name_hint == "hago_dense_bf16")
    assert not (dense.attrs and "tirx.is_scheduled" in dense.attrs)
    ex = tvm.compile(mod, target=clx)
    assert "vdpbf16ps" not in ex.mod.imports[0].inspect_source("asm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = _round(x) @ _round(w)
    assert np.all(np.abs(out - ref) <= RTOL * (np.abs(_round(x)) @ np.abs(_round(w))))


@pytest.mark.llvm
@pytest.mark.parametrize("case, in_block, out_block, with_residual", [
    ("c_3x3_b2", 16, 16, True),  # 16-channel blocks: both outputs written on the register tile
    ("c_1x1_40_24", 8, 8, False),  # NCHW8c: the write-back's own pass, its cast on each of that pass's rows
])
def test_two_outputs_are_the_fp32_result_and_its_bf16_cast_from_one_kernel(case, in_block, out_block,
                                                                             with_residual):
    """``out_dtype=("float32", "bfloat16")``: the fp32 output is bit for bit the fp32-only kernel's, the second
    is that value rounded to bf16 (nearest even), and one kernel writes both (no cast kernel of its own)."""
    import tvm
    from tvm import relax

    xs, ws, strides, padding, dilation, groups, with_bias = CONV[case]
    rng = _rng("two-" + case)
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    bias = rng.standard_normal(ws[0]).astype(np.float32) if with_bias else None
    xb = to_blocked(x, in_block)
    out_shape = np_conv2d(x, w, strides, padding, dilation, groups).shape
    res = relax.const(to_blocked(rng.standard_normal(out_shape).astype(np.float32), out_block)) if with_residual \
        else None
    bb = relax.BlockBuilder()
    for name, dtype in (("one", "float32"), ("two", ("float32", "bfloat16"))):
        _function(bb, name, xb, lambda v, d=dtype: emit_conv2d_bf16(
            bb, v, w, strides, dilation, groups, padding, bias, out_layout="NCHW16c", clip=(0.0, 6.0), out_dtype=d,
            out_block=out_block, residual=res))
    target = tvm.target.Target(TARGET)
    mod = schedule_vnni(bb.get(), target)
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum(k.startswith("hago_conv2d_nchwc_bf16") for k in kernels) == 2, kernels  # one per function
    assert not [k for k in kernels if "cast" in k], kernels
    for gv, func in mod.functions_items():  # the cast runs in a parallel loop, vectorized, not as a pass after
        if gv.name_hint.startswith("hago_conv2d_nchwc_bf16") and len(func.params) > 4 + with_residual:
            sch = tvm.s_tir.Schedule(func)
            loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock(CAST_EPILOGUE))]
            kinds = [lp.kind for lp in loops]
            assert tvm.tirx.ForKind.PARALLEL in kinds and kinds[-1] == tvm.tirx.ForKind.VECTORIZED, kinds
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    one = vm["one"](tvm.runtime.tensor(xb)).numpy()
    fp32, bf = (t.numpy() for t in vm["two"](tvm.runtime.tensor(xb)))
    assert str(fp32.dtype) == "float32" and str(bf.dtype) == "bfloat16" and fp32.shape == bf.shape == one.shape
    assert np.array_equal(fp32, one)
    assert np.array_equal(bf.view(np.uint16), fp32.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert 0 < np.count_nonzero(fp32) and fp32.max() == 6.0  # the clip ran: a test that can see a wrong write-back


@pytest.mark.llvm
@pytest.mark.parametrize("case", ["c_3x3_b2", "c_5x5", "c_5x5_s2_asym", "c_dil2"])
def test_a_bf16_input_is_padded_inside_the_conv_kernel(case):
    """A blocked bf16 input (the previous conv's bf16 output) is zero-padded inside the conv's own kernel, per
    tile, not in a padding pass: one kernel per function, and the result bit for bit the padding pass's and the
    bf16 reference's (strides, asymmetric padding, dilation)."""
    import tvm
    from tvm import relax

    from hago.backends.x86 import bf16

    xs, ws, strides, padding, dilation, groups, _ = CONV[case]
    rng = _rng("pad-" + case)
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    block = 16 if xs[1] % 16 == 0 else 8 if xs[1] % 8 == 0 else 2
    xb = to_blocked(x, block).astype(ml_dtypes.bfloat16)
    bb = relax.BlockBuilder()
    try:
        for name, inside in (("inside", True), ("pass", False)):
            bf16.PAD_INSIDE = inside
            _function(bb, name, xb, lambda v: emit_conv2d_bf16(bb, v, w, strides, dilation, groups, padding,
                                                               out_layout="NCHW16c"))
    finally:
        bf16.PAD_INSIDE = True
    target = tvm.target.Target(TARGET)
    mod = schedule_vnni(bb.get(), target)
    kernels = sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    assert sum(k.startswith("hago_pad_nchwc_bf16") for k in kernels) == 1, kernels  # the "pass" function's only
    assert sum(k.startswith("hago_conv2d_nchwc_bf16") for k in kernels) == 2, kernels
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    inside, passed = (vm[n](tvm.runtime.tensor(xb)).numpy() for n in ("inside", "pass"))
    assert np.array_equal(inside, passed)
    ref = np_conv2d(_round(x), _round(w), strides, padding, dilation, groups)
    scale = np_conv2d(np.abs(_round(x)), np.abs(_round(w)), strides, padding, dilation, groups)
    out = from_blocked(inside, ws[0])
    assert out.shape == ref.shape and np.all(np.abs(out - ref) <= RTOL * scale)  # border rows read zeros, not junk


@pytest.mark.llvm
def test_a_padding_convs_schedule_replays_in_a_fresh_process(tmp_path):
    """A tuned record is a schedule trace replayed in another process, where only ``register_intrinsics`` has
    run: the conv that pads its own input tensorizes with the ``uint16`` intrinsic, which must be among them."""
    import sys

    import tvm
    from tvm import relax
    from tvm.s_tir import Schedule

    from hago.backends.x86.schedules import schedule_kernels

    xs, ws, strides, padding, dilation, groups, _ = CONV["c_3x3_b2"]
    w = _rng("replay").standard_normal(ws).astype(np.float32)
    xb = to_blocked(np.zeros(xs, np.float32), 16).astype(ml_dtypes.bfloat16)
    bb = relax.BlockBuilder()
    _function(bb, "main", xb, lambda v: emit_conv2d_bf16(bb, v, w, strides, dilation, groups, padding,
                                                          out_layout="NCHW16c"))
    func = next(f for gv, f in bb.get().functions_items() if gv.name_hint.startswith("hago_conv2d_nchwc_bf16"))
    sch = Schedule(tvm.IRModule({"main": func}))
    assert schedule_kernels(sch)
    (tmp_path / "func.json").write_text(tvm.ir.save_json(func))
    (tmp_path / "trace.json").write_text(tvm.ir.save_json(sch.trace.as_json()))
    script = f"""
import tvm
from tvm.s_tir import Schedule, Trace
from hago.backends.x86.schedules import register_intrinsics
register_intrinsics()
func = tvm.ir.load_json(open({str(tmp_path / 'func.json')!r}).read())
sch = Schedule(tvm.IRModule({{"main": func}}))
Trace.apply_json_to_schedule(tvm.ir.load_json(open({str(tmp_path / 'trace.json')!r}).read()), sch)
assert "hago_dpbf16ps" in sch.mod["main"].script()
print("replayed")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "replayed" in run.stdout, run.stderr[-2000:]
