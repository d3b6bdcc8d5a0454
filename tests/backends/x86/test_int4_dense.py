"""Packed 4-bit dense weights on VNNI (W4A8): bit-exact, half the bytes, ``vpdpbusd`` in the build.

The kernel cases share one Relax module (one ``tvm.compile``); each is
checked against ``tests/intref.py`` (unpack the independently packed weight,
then ``dense_int``) and against the int8 VNNI kernel on the unpacked weight.
The realize case quantizes a small MLP at 4 bits on ``x86-avx512-vnni``: two
static dense layers and one dynamic (per-row) one, all on the packed kernel.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import intref
from hago.backends.x86.host import cpu_flags
from hago.backends.x86.int4 import pack_int4_dense, packed_shape, unpack_int4_dense
from hago.backends.x86.kernels import emit_dense_vnni, emit_dense_vnni_int4, int4_applicable, schedule_vnni
from hago.backends.x86.vnni_int4 import MAX_K

TARGET = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}
needs_vnni = pytest.mark.skipif("avx512_vnni" not in cpu_flags(), reason="CPU lacks avx512_vnni")

# name -> (x shape, w shape [K, N])
CASES = {
    "m1_k64_n16": ((1, 64), (64, 16)),
    "m3_k36_n20": ((3, 36), (36, 20)),  # K % 8 != 0 (padded to 40), N % 16 != 0
    "b2x3_k40_n40": ((2, 3, 40), (40, 40)),  # leading dims flattened into M
    "m5_k96_n33": ((5, 96), (96, 33)),
}
EXTREME = "m2_k64_n16_extreme"  # x = 255 and w = -8 or 7 everywhere: the largest |16 * acc|


def _data(name, xs, ws):
    rng = np.random.default_rng(sum(map(ord, name)))
    return rng.integers(0, 256, xs, dtype=np.uint8), rng.integers(-8, 8, ws).astype(np.int8)


def _all_cases():
    cases = {name: _data(name, xs, ws) for name, (xs, ws) in CASES.items()}
    w = np.where(np.arange(64 * 16).reshape(64, 16) % 3 == 0, 7, -8).astype(np.int8)
    cases[EXTREME] = (np.full((2, 64), 255, np.uint8), w)
    return cases


def _kernel_constants(func, prefix: str) -> list[np.ndarray]:
    """The constant arguments of the ``call_tir`` calls of ``func`` whose callee starts with ``prefix``."""
    import tvm
    from tvm import relax

    found = []

    def visit(e):
        if (isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir"
                and e.args[0].name_hint.startswith(prefix)):
            found.extend(a.value.numpy() for a in e.args[1].fields if isinstance(a, tvm.ir.expr.Constant))

    relax.analysis.post_order_visit(func, visit)
    return found


# ---- no build ---------------------------------------------------------------
def test_pack_matches_intref_and_round_trips():
    for k, n in [(64, 16), (36, 20), (7, 33), (1, 1)]:
        w = np.random.default_rng(k * n).integers(-8, 8, (k, n)).astype(np.int8)
        p = pack_int4_dense(w)
        assert p.dtype == np.uint8 and p.shape == packed_shape(k, n)
        assert np.array_equal(p, intref.pack_int4(w))
        assert np.array_equal(unpack_int4_dense(p, k, n), w)
        assert np.array_equal(intref.unpack_int4(p, k, n), w)


def test_nibble_layout():
    """Byte [nb, kb, l, b]: low nibble w[8kb + b, 16nb + l], high nibble w[8kb + 4 + b, 16nb + l]."""
    w = np.zeros((16, 32), np.int8)
    w[9, 17], w[13, 17] = -3, 5  # kb = 1, b = 1, lane 1 of block 1: low and high nibble of one byte
    p = pack_int4_dense(w)
    assert p[1, 1, 1, 1] == (5 << 4) | (-3 & 0xF)
    assert np.count_nonzero(p) == 1


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int4_dense(np.array([[8]], np.int8))
    with pytest.raises(ValueError):
        intref.pack_int4(np.array([[-9]], np.int8))


def test_applicability():
    assert int4_applicable((1, 36), (36, 20))
    assert not int4_applicable((1, 36), (35, 20))
    assert not int4_applicable(("n", 36), (36, 20))
    assert int4_applicable((1, MAX_K), (MAX_K, 16)) and not int4_applicable((1, MAX_K + 1), (MAX_K + 1, 16))


def test_int4_register_tile_divides_and_fits():
    from hago.backends.x86.vnni_schedule import int4_register_tile

    for rows, blocks in [(1, 24), (128, 96), (7, 3), (6, 96), (97, 5)]:
        r, b = int4_register_tile(rows, blocks)
        assert rows % r == 0 and blocks % b == 0 and r * b + 2 * b <= 30
    assert int4_register_tile(1, 24) == (1, 8)  # batch 1: 8 independent accumulators
    assert int4_register_tile(128, 96) == (8, 3)


# ---- one build for the kernel cases -----------------------------------------
@pytest.fixture(scope="module")
def built():
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    cases = _all_cases()
    for name, (x_np, w_np) in cases.items():
        for suffix, emit in (("", emit_dense_vnni_int4), ("_int8", emit_dense_vnni)):
            x = relax.Var("x", relax.TensorType(x_np.shape, "uint8"))
            with bb.function(name + suffix, [x]):
                with bb.dataflow():
                    out = bb.emit_output(emit(bb, x, w_np))
                bb.emit_func_output(out)
    target = tvm.target.Target(TARGET)
    mod = schedule_vnni(bb.get(), target)
    return mod, tvm.compile(mod, target=target), cases


@needs_vnni
@pytest.mark.llvm
@pytest.mark.parametrize("name", [*CASES, EXTREME])
def test_bit_exact_against_intref_and_int8_kernel(built, name):
    import tvm
    from tvm import relax

    _, ex, cases = built
    x, w = cases[name]
    k, n = w.shape
    ref = intref.dense_int4(x.reshape(-1, k), intref.pack_int4(w), k, n, 0).reshape(*x.shape[:-1], n)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm[name](tvm.runtime.tensor(x)).numpy()
    assert out.dtype == np.int32 and out.shape == ref.shape
    assert np.array_equal(out, ref)
    assert np.array_equal(out, vm[name + "_int8"](tvm.runtime.tensor(x)).numpy())


@pytest.mark.llvm
def test_packed_constant_is_half_the_bytes(built):
    mod, _, cases = built
    for name, (_, w) in cases.items():
        (packed,) = _kernel_constants(mod[name], "hago_dense_int4_vnni")
        (int8,) = _kernel_constants(mod[name + "_int8"], "hago_dense_vnni")
        k, n = w.shape
        assert packed.dtype == np.uint8 and packed.shape == packed_shape(k, n)
        assert np.array_equal(unpack_int4_dense(packed, k, n), w)
        if k % 8 == 0:  # both pad K to the same length: exactly half
            assert 2 * packed.nbytes == int8.nbytes, name


@needs_vnni
@pytest.mark.llvm
def test_schedule_and_assembly(built):
    import tvm

    mod, ex, _ = built
    kernels = {gv.name_hint: f for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith("hago_dense_int4_vnni")}
    assert kernels and all(f.attrs["tirx.is_scheduled"] for f in kernels.values())
    asm = ex.mod.imports[0].inspect_source("asm")
    assert len(re.findall(r"\bvpdpbusd\b", asm)) >= 2 * len(kernels)


# ---- realize: static and dynamic dense at 4 bits ----------------------------
def _mlp():
    """``dense -> relu -> dense -> gelu -> dense`` (36 -> 40 -> 24 -> 20) as a Relax module, symbolic batch.

    Built in Relax, not torch: ``torch.export`` would cost more than the rest of the test.
    """
    import tvm
    from tvm import relax
    from tvm.relax import op as O

    rng = np.random.default_rng(0)

    def dense(y, k, n):
        w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
        return O.add(O.matmul(y, relax.const(w)), relax.const(rng.standard_normal(n).astype(np.float32) * 0.1))

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("n", "int64"), 36), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(O.nn.relu(dense(x, 36, 40)))
            y = bb.emit(O.nn.gelu(dense(y, 40, 24)))
            y = bb.emit_output(dense(y, 24, 20))
        bb.emit_func_output(y)
    return bb.get()


@needs_vnni
def test_realized_mlp_packs_every_4bit_dense_bit_exact(monkeypatch):
    """Two static dense layers (graph input, relu) and a dynamic one (after a float gelu), all 4-bit: each runs
    on the packed kernel with a uint8 weight of half the int8 kernel's bytes, and the build's output equals the
    same strategy realized with the int8 kernel on the unpacked weights, exactly."""
    import tvm
    from tvm import relax

    from hago.annotate import AnnotateConfig
    from hago.backends.x86 import kernels
    from hago.build import build
    from hago.compiler import quantize, static_pair
    from hago.hwspec import HardwareSpec
    from hago.weight_bytes import weight_bytes

    x = np.random.default_rng(1).standard_normal((16, 36)).astype(np.float32)
    spec = HardwareSpec.load("x86-avx512-vnni")
    q = quantize(_mlp(), spec, {"x": x}, calibrator="minmax", annotate_config=AnnotateConfig(weight_bits=4))
    dense = [c for c in q.strategy.ops.values() if c.kind == "dense"]
    assert len(dense) == 3 and all(c.mode == "integer" and c.weight_bits == 4 for c in dense)
    assert any(e.dynamic for e in q.strategy.edges.values())

    _, int4_mod = static_pair(q, spec, 2)
    monkeypatch.setattr(kernels, "int4_applicable", lambda *a: False)  # the int8 kernel, same integer weights
    _, int8_mod = static_pair(q, spec, 2)
    packed = _kernel_constants(int4_mod["main"], "hago_dense_int4_vnni")
    int8 = _kernel_constants(int8_mod["main"], "hago_dense_vnni")
    assert len(packed) == len(int8) == 3 and all(p.dtype == np.uint8 for p in packed)
    assert sum(p.nbytes for p in packed) <= 0.55 * sum(w.nbytes for w in int8)
    # what ``hago compile`` reports: every weight of this MLP is a packed one
    assert weight_bytes(int4_mod) == sum(p.nbytes for p in packed) <= 0.55 * weight_bytes(int8_mod)

    target = tvm.target.Target(spec.target)
    outs = [relax.VirtualMachine(build(m, target), tvm.cpu())["main"](tvm.runtime.tensor(x[:2])).numpy()
            for m in (int4_mod, int8_mod)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(outs[0]).max() > 0


def test_plans_pick_the_packed_kernel_for_4bit_dense():
    """x86: 4-bit weights -> the packed kernel, 8-bit -> the int8 one. AMX: a 4-bit dense with few rows (where
    AMX would run VNNI anyway) gets the packed kernel; with many it stays on the tiles, 4-bit values in int8
    (the tiles take no nibbles, and measured at 128 rows they are 4-7x faster than the packed VNNI kernel)."""
    from hago.backends.amx.plan import AMXPlan
    from hago.backends.x86.plan import X86Plan
    from hago.strategy import OpChoice

    def choice(bits):
        return OpChoice("dense", "integer", descriptor={"weight_layout": "NK16n4k"}, weight_bits=bits)

    x86, amx = X86Plan.__new__(X86Plan), AMXPlan.__new__(AMXPlan)
    assert x86.dense_kernel(choice(4), "uint8", [1, 64], (64, 16)) is emit_dense_vnni_int4
    assert x86.dense_kernel(choice(8), "uint8", [1, 64], (64, 16)) is emit_dense_vnni
    assert x86.dense_kernel(choice(4), "uint8", [1, MAX_K + 8], (MAX_K + 8, 16)) is emit_dense_vnni  # int32 range
    assert amx.dense_kernel(choice(4), "uint8", [1, 64], (64, 16)) is emit_dense_vnni_int4
    assert amx.dense_kernel(choice(8), "uint8", [1, 64], (64, 16)) is emit_dense_vnni
    for bits in (4, 8):
        assert amx.dense_kernel(choice(bits), "uint8", [64, 64], (64, 16)) not in (emit_dense_vnni_int4,
                                                                                   emit_dense_vnni)


@pytest.mark.llvm
def test_target_without_vnni_runs_the_naive_kernel_exactly():
    """skylake-avx512 has no vpdpbusd: the kernel stays unscheduled and its plain loops compute the same."""
    import tvm
    from tvm import relax

    x_np, w_np = _data("skx4", (3, 36), (36, 20))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_np.shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit_dense_vnni_int4(bb, x, w_np))
        bb.emit_func_output(out)
    skx = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    mod = bb.get()
    assert schedule_vnni(mod, skx).same_as(mod)
    out = relax.VirtualMachine(tvm.compile(mod, target=skx), tvm.cpu())["main"](tvm.runtime.tensor(x_np)).numpy()
    assert np.array_equal(out, intref.dense_int4(x_np, intref.pack_int4(w_np), 36, 20, 0))
