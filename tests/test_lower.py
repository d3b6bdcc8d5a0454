"""hago.lower: the CPU pipeline fuses each requantize chain into one parallel, vectorized kernel.

TVM 0.27's default CPU pipeline runs every op of a requantize chain as its own
kernel; these tests pin that hago's build fuses them, schedules the fused
element-wise code, and still computes exactly what the unfused program does.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from hago import build as build_mod
from hago.compiler import quantize
from hago.hwspec import HardwareSpec
from hago.lower import fuse, schedule_elementwise

pytestmark = pytest.mark.llvm


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(y + self.c2(y))
        return self.fc(torch.flatten(y, 1))


@pytest.fixture(scope="module")
def realized():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    spec = HardwareSpec.load("x86-avx512-vnni")
    q = quantize(_Residual().eval(), spec, {"x": calib}, calibrator="minmax",
                 example_inputs=(torch.from_numpy(calib[:4]),))
    return build_mod.static_batch(q.realized.mod, 4), calib[:4], build_mod.target_of(spec)


def _kernel_calls(executable) -> list[str]:
    return re.findall(r"call\s+(\S+)\s+in:", executable.as_text())


def test_requantize_chain_is_one_kernel_and_bit_exact(realized, run_tvm):
    mod, x, target = realized
    ex = build_mod.build(mod, target, "test")
    calls = [c for c in _kernel_calls(ex) if not c.startswith("vm.builtin")]
    # no op of the fixed-point requantize runs as a kernel of its own
    assert not [c for c in calls if re.fullmatch(r"(right_shift|tir_abs|where|multiply|cast)\d*", c)], calls
    assert any("right_shift" in c and c.startswith("fused_") for c in calls), calls
    plain = _kernel_calls(tvm.compile(mod, target=target))
    assert len(calls) * 2 < len(plain), (len(calls), len(plain))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, run_tvm(mod, x))  # the unfused, unscheduled reference


def test_fused_elementwise_code_is_parallel_and_vectorized(realized):
    mod, _, target = realized
    scheduled = schedule_elementwise(fuse(mod, target))
    requant = [f for gv, f in scheduled.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and "right_shift" in gv.name_hint]
    assert requant
    for f in requant:
        text = f.script()
        assert "T.vectorized" in text, text
    assert any("T.parallel" in f.script() for f in requant)


def _float_module(kind: str):
    """One float conv (stride 1 or 2) + bias + relu, or one dense, at batch 1, with its input."""
    from tvm.relax import op as O

    rng = np.random.default_rng(3)
    bb = relax.BlockBuilder()
    if kind == "dense":
        x_np = rng.standard_normal((1, 24, 64)).astype(np.float32)
        w = rng.standard_normal((64, 96)).astype(np.float32)
    else:
        x_np = rng.standard_normal((1, 8, 20, 32)).astype(np.float32)
        w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    x = relax.Var("x", relax.TensorType(x_np.shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if kind == "dense":
                y = bb.emit(O.matmul(x, relax.const(w)))
            else:
                stride = 2 if kind == "conv_s2" else 1
                y = bb.emit(O.nn.conv2d(x, relax.const(w), strides=stride, padding=1))
                y = bb.emit(O.nn.relu(O.add(y, relax.const(rng.standard_normal((1, 16, 1, 1)).astype(np.float32)))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), x_np


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_float_reductions_get_a_register_tile(kind, cpu_target):
    """An untuned float conv (stride 1) or dense is register-tiled: accumulators written back from a cache at the
    tile, lanes vectorized; the result equals TVM's naive loop nest (same reduction order, so bit-exact)."""
    from hago.lower import finish

    mod, x = _float_module(kind)
    target = tvm.target.Target(cpu_target)
    scheduled = schedule_elementwise(fuse(mod, target))
    text = scheduled.script(show_meta=False)
    assert "_global" in text and "T.vectorized" in text and "T.unroll" in text
    ex = finish(fuse(mod, target), target)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    naive = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(out, naive)


def test_a_batch_1_dense_keeps_several_accumulator_chains(cpu_target):
    """One row x 1000 columns (a classifier at batch 1; 1000 = 125 vectors of 8): the tile is 5 vectors wide, not
    1 (one FMA chain, its latency at every step: 115 us -> 61 us for 1280 x 1000 on session 15's EPYC), with 25
    tiles left for the threads; bit-exact against the naive loop nest (same reduction order)."""
    from tvm.relax import op as O

    from hago.lower import finish

    rng = np.random.default_rng(4)
    x_np = rng.standard_normal((1, 96)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_np.shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(O.matmul(x, relax.const(rng.standard_normal((96, 1000)).astype(np.float32))))
        bb.emit_func_output(out)
    mod = bb.get()
    target = tvm.target.Target(cpu_target)
    func = next(f for _, f in schedule_elementwise(fuse(mod, target)).functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in f.script())
    text = func.script()
    assert "T.unroll(T.int64(5))" in text and "T.parallel(T.int64(25))" in text, text
    ex = finish(fuse(mod, target), target)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x_np)).numpy()
    naive = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())["main"](tvm.runtime.tensor(x_np)).numpy()
    np.testing.assert_array_equal(got, naive)


@pytest.mark.parametrize("rows, classes", [(1, 1001), (1, 10), (1, 1000), (3, 1001), (3, 7)])
def test_float_dense_is_tiled_on_a_layout_the_tile_takes(rows, classes, cpu_target):
    """Widths the vector tile cannot split (1001 classes: TF-slim's background class; 10; 7) and any batch-1 dense:
    the CPU backends compute the matmul on zero-padded weight columns (1280 x 1001 at batch 1: 1.33 ms naive ->
    0.05 ms on session 15's EPYC), a single row on ``[N/64, K, 64]`` column panels that each tile streams whole,
    and slice the result; the numbers are numpy's."""
    from tvm.relax import op as O

    from hago.backends import for_target
    from hago.lower import finish

    rng = np.random.default_rng(5)
    x_np = rng.standard_normal((rows, 96)).astype(np.float32)
    w = rng.standard_normal((96, classes)).astype(np.float32)
    b = rng.standard_normal((classes,)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_np.shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(O.add(O.matmul(x, relax.const(w)), relax.const(b)))
        bb.emit_func_output(out)
    mod = bb.get()
    target = tvm.target.Target(cpu_target)
    backend = for_target(target)
    fused = fuse(mod, target, backend)
    text = schedule_elementwise(fused).script(show_meta=False)
    padded = -(-classes // 64) * 64 if rows == 1 else -(-classes // 16) * 16
    assert "_global" in text, text  # register-tiled, its accumulators written back from a cache
    if rows == 1:  # the weight as panels: a batched matmul of the row against each
        assert f"T.Buffer((T.int64({padded // 64}), T.int64(96), T.int64(64))" in text, text
    else:
        assert f"T.Buffer((T.int64(96), T.int64({padded}))" in text, text
    assert ("strided_slice" in text) == (padded != classes), text
    got = relax.VirtualMachine(finish(fused, target, backend=backend), tvm.cpu())["main"](
        tvm.runtime.tensor(x_np)).numpy()
    assert got.shape == (rows, classes)
    np.testing.assert_allclose(got, x_np @ w + b, rtol=1e-5, atol=1e-4)


def test_strided_conv_keeps_the_plain_parallel_schedule(cpu_target):
    """Stride 2 would make the vector lanes a gather: that conv keeps parallel outer loops only."""
    mod, _ = _float_module("conv_s2")
    target = tvm.target.Target(cpu_target)
    text = schedule_elementwise(fuse(mod, target)).script(show_meta=False)
    assert "conv2d_nchw_global" not in text and "T.parallel" in text


def _one_op_module(op, shape):
    from tvm.relax import op as O  # noqa: F401  (op is a callable of relax.op)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    return bb.get()


def test_gelu_softmax_and_sigmoid_use_fast_vectorizable_math(cpu_target):
    """GELU's erf, softmax's exp and sigmoid's exp are TOPI's polynomial approximations (no libm call per
    element), the softmax row max/sum run as lane-wide partial reductions (rfactor), and the results stay
    within 1e-5. Sigmoid's libm ``expf`` per lane made SiLU the largest cost of EfficientNet-B0's FP32 build;
    it is checked out to where ``exp`` saturates (+-120), as is ``nn.silu``, the op prepare makes of it."""
    from tvm.relax import op as O

    from hago.lower import finish

    target = tvm.target.Target(cpu_target)
    x = np.random.default_rng(4).standard_normal((2, 4, 32, 64)).astype(np.float32) * 3
    wide = np.concatenate([x[:1], np.linspace(-120, 120, x[:1].size, dtype=np.float32).reshape(x[:1].shape)])
    t = torch.from_numpy(x)
    cases = {
        "gelu": (O.nn.gelu, x, torch.nn.functional.gelu(t).numpy()),
        "softmax": (lambda v: O.nn.softmax(v, -1), x, torch.softmax(t, -1).numpy()),
        "silu": (lambda v: O.multiply(v, O.sigmoid(v)), x, torch.nn.functional.silu(t).numpy()),
        "nn.silu": (O.nn.silu, wide, torch.nn.functional.silu(torch.from_numpy(wide)).numpy()),
        "sigmoid": (O.sigmoid, wide, torch.sigmoid(torch.from_numpy(wide)).numpy()),
    }
    for name, (op, x, ref) in cases.items():
        fused = fuse(_one_op_module(op, x.shape), target)
        text = fused.script(show_meta=False)
        assert "T.erf(" not in text and "T.exp(" not in text and "T.sigmoid(" not in text, name
        scheduled = schedule_elementwise(fused).script(show_meta=False)
        if name == "softmax":
            assert "_rf" in scheduled and "T.vectorized" in scheduled
        out = relax.VirtualMachine(finish(fused, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=name)
