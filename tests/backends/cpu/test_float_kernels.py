"""The CPU backends' blocked float kernels: every conv shape a real network has, pools and matmuls, against torch.

Each case is built the way ``hago compile`` builds a float layer (the
backend's layout pass, legalization and default schedules, untuned) and must
match torch to 1e-4 of the output's magnitude. The conv cases also assert that
the blocked kernel really ran (a silent fall-back to TVM's naive loop would
still be correct, and 50x slower).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tvm
from tvm import relax

from hago.backends.registry import get_backend
from hago.lower import fuse

X86 = get_backend("x86")
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
TOL = 1e-4


def _module(shape, body):
    """A one-input Relax module ``main(x) = body(bb, x)``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x, target=AVX512, backend=X86):
    vm = relax.VirtualMachine(backend.build(mod, target), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _kernels(mod, target=AVX512, backend=X86) -> list[str]:
    """The blocked float kernel kinds among the fused module's PrimFuncs."""
    from tvm.s_tir import Schedule

    from hago.backends.cpu.float_schedule import kernel_blocks

    fused = fuse(mod, target, backend)
    return [kind for _, func in fused.functions_items() if isinstance(func, tvm.tirx.PrimFunc)
            for kind, _ in kernel_blocks(Schedule(tvm.IRModule({"main": func})))]


def _close(out, ref):
    np.testing.assert_allclose(out, ref, rtol=TOL, atol=TOL * max(1.0, float(np.abs(ref).max())))


# (in, out, size, kernel, stride, groups, dilation)
CONVS = [
    pytest.param(64, 64, 28, 3, 1, 1, 1, id="3x3-s1"),
    pytest.param(32, 64, 29, 3, 2, 1, 1, id="3x3-s2-odd-size"),
    pytest.param(64, 32, 14, 1, 1, 1, 1, id="1x1"),
    pytest.param(32, 48, 14, 1, 2, 1, 1, id="1x1-s2"),
    pytest.param(24, 40, 15, 5, 1, 1, 1, id="5x5-channels-24-40"),
    pytest.param(3, 32, 33, 7, 2, 1, 1, id="7x7-s2-rgb"),
    pytest.param(40, 24, 12, 3, 1, 1, 2, id="dilated"),
    pytest.param(64, 64, 14, 3, 1, 4, 1, id="grouped-4"),
    pytest.param(32, 32, 28, 3, 1, 32, 1, id="depthwise-3x3"),
    pytest.param(48, 48, 27, 5, 2, 48, 1, id="depthwise-5x5-s2"),
    pytest.param(24, 24, 14, 3, 2, 24, 1, id="depthwise-channels-24"),
]


@pytest.mark.parametrize("cin,cout,size,k,stride,groups,dilation", CONVS)
def test_float_conv_matches_torch_and_runs_blocked(cin, cout, size, k, stride, groups, dilation):
    rng = np.random.default_rng(cin * 1000 + cout + k)
    w = (rng.standard_normal((cout, cin // groups, k, k)) / np.sqrt(cin // groups * k * k)).astype("float32")
    b = rng.standard_normal(cout).astype("float32")
    x = rng.standard_normal((1, cin, size, size)).astype("float32")
    pad = dilation * (k // 2)

    def body(bb, v):
        y = bb.emit(relax.op.nn.conv2d(v, relax.const(w), strides=[stride] * 2, padding=[pad] * 4,
                                       dilation=[dilation] * 2, groups=groups))
        y = bb.emit(relax.op.add(y, relax.const(b.reshape(1, cout, 1, 1))))
        return bb.emit(relax.op.clip(y, 0.0, 6.0))  # ReLU6: computed on the register tile

    mod = _module(x.shape, body)
    expected = "depthwise_nchwc_float" if groups == cin == cout else "conv2d_nchwc_float"
    assert _kernels(mod) == [expected]
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride, pad,
                                     dilation, groups).clamp(0, 6).numpy()
    _close(_run(mod, x), ref)


def test_blocked_layout_carries_through_a_residual_block():
    """conv -> relu -> conv + skip -> relu: one layout change in, one out, the add fused into the second conv."""
    rng = np.random.default_rng(1)
    w1, w2 = (rng.standard_normal((32, 32, 3, 3)).astype("float32") * 0.1 for _ in range(2))
    x = rng.standard_normal((1, 32, 20, 20)).astype("float32")

    def body(bb, v):
        y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(v, relax.const(w1), padding=[1] * 4))))
        y = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(y, relax.const(w2), padding=[1] * 4)), v))
        return bb.emit(relax.op.nn.relu(y))

    mod = _module(x.shape, body)
    fused = fuse(mod, AVX512, X86)
    names = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("layout_transform" in n for n in names) == 2, names  # NCHW->NCHW16c once, back once
    assert any("conv2d_nchwc" in n and "add" in n and "relu" in n for n in names), names
    xt = torch.from_numpy(x)
    t = torch.relu(torch.nn.functional.conv2d(xt, torch.from_numpy(w1), padding=1))
    ref = torch.relu(torch.nn.functional.conv2d(t, torch.from_numpy(w2), padding=1) + xt).numpy()
    _close(_run(mod, x), ref)


def test_avx2_target_uses_8_lane_blocks():
    """Without AVX-512 the blocks are 8 floats (ymm), and the build still matches torch on this CPU."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((24, 16, 3, 3)).astype("float32") * 0.1
    x = rng.standard_normal((1, 16, 10, 10)).astype("float32")
    mod = _module(x.shape, lambda bb, v: bb.emit(relax.op.nn.conv2d(v, relax.const(w), padding=[1] * 4)))
    assert X86.vector_lanes(AVX2) == 8 and X86.vector_lanes(AVX512) == 16
    assert _kernels(mod, AVX2) == ["conv2d_nchwc_float"]
    fused = fuse(mod, AVX2, X86)
    conv = next(f for gv, f in fused.functions_items() if "conv2d_nchwc" in gv.name_hint)
    data = conv.params[0]  # TVM 0.27: PrimFunc params are the buffers
    assert [int(s) for s in data.shape] == [1, 2, 10, 10, 8]  # NCHW8c, the padding done inside the kernel
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
    _close(_run(mod, x, AVX2), ref)


def _row_head(pooled, fc):
    centred = pooled - pooled.max(-1, keepdim=True).values
    return centred @ torch.from_numpy(fc) + torch.from_numpy(fc[0])


@pytest.mark.parametrize("pool", ["max3s2", "avg2", "mean", "mean_dropping_dims", "squeeze_excite_6"])
def test_pools_on_blocked_activations(pool):
    """The conv before each pool stays blocked and the result matches torch. Two heads made
    ConvertLayout abort the whole module, so every float conv in it ran NCHW: ``x.mean([2, 3])`` without
    keepdims followed by a row reduction (a dense quantized per row at run time; MNASNet's head), and a
    squeeze-excitation whose squeezed width no block fits (EfficientNet-B0's 144 -> 6 channels)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 16, 3, 3)).astype("float32") * 0.1
    x = rng.standard_normal((1, 16, 15, 15)).astype("float32")
    fc = rng.standard_normal((48, 48)).astype("float32")
    se1, se2 = (rng.standard_normal(s).astype("float32") * 0.3 for s in ((6, 48, 1, 1), (48, 6, 1, 1)))

    def body(bb, v):
        y = bb.emit(relax.op.nn.conv2d(v, relax.const(w), padding=[1] * 4))
        if pool == "max3s2":
            return bb.emit(relax.op.nn.max_pool2d(y, [3, 3], [2, 2], [1, 1, 1, 1]))
        if pool == "avg2":
            return bb.emit(relax.op.nn.avg_pool2d(y, [2, 2], [2, 2]))
        if pool == "mean":
            return bb.emit(relax.op.mean(y, axis=[2, 3], keepdims=True))
        if pool == "squeeze_excite_6":  # torchvision's squeeze-excitation gate, squeezed to 6 channels
            g = bb.emit(relax.op.mean(y, axis=[-1, -2], keepdims=True))
            g = bb.emit(relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(g, relax.const(se1)))))
            g = bb.emit(relax.op.sigmoid(bb.emit(relax.op.nn.conv2d(g, relax.const(se2)))))
            return bb.emit(relax.op.multiply(y, g))
        # a classifier head quantized per row at run time: the pooled [N, C], its row's max, a dense
        y = bb.emit(relax.op.mean(y, axis=[2, 3]))
        y = bb.emit(relax.op.subtract(y, bb.emit(relax.op.max(y, axis=[-1], keepdims=True))))
        return bb.emit(relax.op.add(bb.emit(relax.op.matmul(y, relax.const(fc))), relax.const(fc[0])))

    t = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1)
    ref = {"max3s2": lambda: torch.nn.functional.max_pool2d(t, 3, 2, 1),
           "avg2": lambda: torch.nn.functional.avg_pool2d(t, 2, 2),
           "mean": lambda: t.mean((2, 3), keepdim=True),
           "mean_dropping_dims": lambda: _row_head(t.mean((2, 3)), fc),
           "squeeze_excite_6": lambda: t * torch.sigmoid(F.conv2d(torch.relu(F.conv2d(t.mean((-1, -2), keepdim=True),
                                                                                       torch.from_numpy(se1))),
                                                                  torch.from_numpy(se2)))}[pool]().numpy()
    mod = _module(x.shape, body)
    assert _kernels(mod)[0] == "conv2d_nchwc_float"  # the SE's 6-channel convs stay plain: no block fits
    _close(_run(mod, x), ref)


def _largest_unrolled_body(mod, target=AVX512, backend=X86) -> int:
    """The most copies of one block that unrolling writes out, over the scheduled module's functions."""
    from tvm.s_tir import Schedule

    from hago.lower import schedule_elementwise, tile_registers

    scheduled = schedule_elementwise(fuse(backend.schedule(mod, target), target, backend),
                                     lambda sch: backend.schedule_fused(sch, target), tile_registers(target, backend))
    most = 1
    for _, func in scheduled.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            sch = Schedule(tvm.IRModule({"main": func}))
            for blk in sch.get_child_blocks(sch.get_sblock("root")):
                unrolled = [int(sch.get(lp).extent) for lp in sch.get_loops(blk)
                            if sch.get(lp).kind == tvm.tirx.ForKind.UNROLLED]
                most = max(most, int(np.prod(unrolled)))
    return most


def test_squeeze_excite_scale_runs_as_a_pass_of_its_own():
    """A squeeze-excitation whose channels are blocked (48 -> 16 -> 48): the excitation conv computes one
    pixel, and its sigmoid and the scale of the whole 28x28 input fuse into it. Written back on the conv's
    register tile, that scale was unrolled over the picture (3 x 56 x 56 vector bodies in EfficientNet-B0:
    6 minutes of LLVM and a slow kernel); it runs as its own parallel pass, and the result matches torch."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 48, 28, 28)).astype("float32")
    se1, se2 = (rng.standard_normal(s).astype("float32") * 0.3 for s in ((16, 48, 1, 1), (48, 16, 1, 1)))

    def body(bb, v):
        g = bb.emit(relax.op.mean(v, axis=[2, 3], keepdims=True))
        g = bb.emit(relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(g, relax.const(se1)))))
        g = bb.emit(relax.op.sigmoid(bb.emit(relax.op.nn.conv2d(g, relax.const(se2)))))
        return bb.emit(relax.op.multiply(v, g))

    t = torch.from_numpy(x)
    ref = t * torch.sigmoid(F.conv2d(torch.relu(F.conv2d(t.mean((2, 3), keepdim=True), torch.from_numpy(se1))),
                                     torch.from_numpy(se2)))
    mod = _module(x.shape, body)
    assert _kernels(mod) == ["conv2d_nchwc_float"] * 2
    assert _largest_unrolled_body(mod) <= 64
    _close(_run(mod, x), ref.numpy())


@pytest.mark.parametrize("tail", ["squeeze_minus_2", "mean_minus_axes_then_row_max"])
def test_negative_squeeze_axes_keep_convs_blocked(tail):
    """ConvertLayout died (``std::bad_alloc``) on any squeeze with a negative axis, and every float conv of
    the module stayed NCHW: ViT-B/32 from ``torch.onnx.export`` squeezes its packed q/k/v with ``axis=-2`` (its
    patch-embedding conv ran naive, 67 of 150 ms), and ``x.mean([-1, -2])`` becomes such a squeeze too."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((32, 3, 4, 4)).astype("float32") * 0.2
    x = rng.standard_normal((1, 3, 16, 16)).astype("float32")
    t = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=4)

    def body(bb, v):
        y = bb.emit(relax.op.nn.conv2d(v, relax.const(w), strides=[4, 4]))
        if tail == "squeeze_minus_2":  # [1, 32, 4, 4] -> [1, 32, 16] -> [1, 16, 1, 32] -> [1, 16, 32]
            y = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(y, (1, 32, 16))), [0, 2, 1]))
            return bb.emit(relax.op.squeeze(bb.emit(relax.op.expand_dims(y, [2])), [-2]))
        y = bb.emit(relax.op.mean(y, axis=[-1, -2]))
        return bb.emit(relax.op.subtract(y, bb.emit(relax.op.max(y, axis=[-1], keepdims=True))))

    if tail == "squeeze_minus_2":
        ref = t.reshape(1, 32, 16).permute(0, 2, 1)
    else:
        ref = t.mean((-1, -2))
        ref = ref - ref.max(-1, keepdim=True).values
    mod = _module(x.shape, body)
    assert _kernels(mod) == ["conv2d_nchwc_float"]
    _close(_run(mod, x), ref.numpy())


@pytest.mark.parametrize("m,k,n", [(1, 512, 1000), (128, 384, 1536), (7, 100, 30), (None, 100, 30)])
def test_dense(m, k, n):
    """``m`` None: a vector times the weight (``[K] @ [K, N]``), which has no rows to tile."""
    rng = np.random.default_rng((m or 0) + k + n)
    w = rng.standard_normal((k, n)).astype("float32") / np.sqrt(k)
    b = rng.standard_normal(n).astype("float32")
    x = rng.standard_normal((k,) if m is None else (m, k)).astype("float32")
    mod = _module(x.shape, lambda bb, v: bb.emit(relax.op.add(bb.emit(relax.op.matmul(v, relax.const(w))),
                                                                relax.const(b))))
    _close(_run(mod, x), x @ w + b)


@pytest.mark.parametrize("x_shape,tile", [((50, 1, 768), 20), ((1, 49, 384), 21), ((1, 197, 64), 20)])
def test_dense_rows_fill_the_register_tile(x_shape, tile):
    """A float dense layer's rows, however the leading dims hold them, share one register tile that fills
    AVX-512's 32 registers: ``[50, 1, 768]`` (ViT-B/32's attention in-projection from torch.onnx.export) was 50
    one-row products each streaming the weight, and the 4 x 2 tile used 8 accumulators (5 x 4 = 20 for 50 rows,
    7 x 3 = 21 for Swin's 49, of 384 columns). Together 2.5 -> 0.43 ms for ViT's in-projection on session 19's
    EPYC. 197 rows (ViT-B/16's tokens, a prime) are padded to 200 for a 5 x 4 tile (a one-row tile before:
    197 x 768 x 3072 with its bias and GELU 13.4 -> 3.2 ms). AVX2 keeps the small tile; both match numpy."""
    rng = np.random.default_rng(sum(x_shape))
    k, n = x_shape[-1], 384
    w = rng.standard_normal((k, n)).astype("float32") / np.sqrt(k)
    b = rng.standard_normal(n).astype("float32")
    x = rng.standard_normal(x_shape).astype("float32")
    mod = _module(x.shape, lambda bb, v: bb.emit(relax.op.add(bb.emit(relax.op.matmul(v, relax.const(w))),
                                                                relax.const(b))))
    assert _largest_unrolled_body(mod) == tile
    assert _largest_unrolled_body(mod, AVX2) <= 8
    _close(_run(mod, x), x @ w + b)
    _close(_run(mod, x, AVX2), x @ w + b)


@pytest.mark.parametrize("shape_a,shape_b", [((12, 128, 32), (12, 32, 128)), ((12, 128, 128), (12, 128, 32)),
                                             ((3, 17, 9), (3, 9, 20))])
def test_batch_matmul(shape_a, shape_b):
    rng = np.random.default_rng(4)
    a = rng.standard_normal(shape_a).astype("float32")
    b = rng.standard_normal(shape_b).astype("float32")
    bb = relax.BlockBuilder()
    va, vb = relax.Var("a", relax.TensorType(shape_a, "float32")), relax.Var("b", relax.TensorType(shape_b, "float32"))
    with bb.function("main", [va, vb]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(va, vb))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(X86.build(bb.get(), AVX512), tvm.cpu())
    _close(vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy(), a @ b)


def test_attention_products_with_prime_token_counts_are_tiled():
    """ViT-B/16's attention on 197 tokens: ``q @ k^T`` (197 columns, no whole vector) ran TVM's naive loop,
    10 ms a layer, and ``p @ v`` a one-row tile (197 rows, a prime); both padded to whole tiles now (5 x 4 and
    5 x 4 accumulators), sliced back, and equal to numpy."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((12, 197, 64)).astype("float32") for _ in range(3))
    kt = np.ascontiguousarray(k.transpose(0, 2, 1))
    bb = relax.BlockBuilder()
    vq, vk, vv = (relax.Var(n, relax.TensorType(a.shape, "float32")) for n, a in (("q", q), ("kt", kt), ("v", v)))
    with bb.function("main", [vq, vk, vv]):
        with bb.dataflow():
            s = bb.emit(relax.op.matmul(vq, vk))
            out = bb.emit_output(relax.op.matmul(s, vv))
        bb.emit_func_output(out)
    mod = bb.get()
    assert _largest_unrolled_body(mod) >= 16
    vm = relax.VirtualMachine(X86.build(mod, AVX512), tvm.cpu())
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (q, kt, v))).numpy()
    _close(got, (q @ kt) @ v)


def test_channel_block_choice():
    from hago.backends.cpu.float_layout import channel_block

    assert [channel_block(c, 16) for c in (64, 24, 40, 112, 20, 3, 18)] == [16, 8, 8, 16, 4, None, None]
    assert channel_block(64, 4) == 4


def test_arm_float_convs_use_4_lane_blocks_and_match_torch_under_qemu(tmp_path):
    """The same kernels at NEON width (NCHW4c, 4-float vectors), cross-compiled and run by qemu for the Pi 4."""
    import shutil

    from hago.build import build_for, export
    from hago.measure import qemu

    missing = [t for t in ("aarch64-linux-gnu-g++", qemu.QEMU) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: tools/install_arm.sh")
    ok, why = qemu.is_available()
    if not ok:
        pytest.skip(why)
    from hago.backends.registry import backend_of
    from hago.build import target_of
    from hago.hwspec import HardwareSpec

    spec = HardwareSpec.load("rpi4")
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((12, 3, 3, 3)).astype("float32") * 0.3
    w2 = rng.standard_normal((12, 1, 3, 3)).astype("float32") * 0.3  # depthwise
    x = rng.standard_normal((1, 3, 9, 9)).astype("float32")

    def body(bb, v):
        y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(v, relax.const(w1), padding=[1] * 4))))
        y = bb.emit(relax.op.nn.conv2d(y, relax.const(w2), strides=[2, 2], padding=[1] * 4, groups=12))
        return bb.emit(relax.op.nn.max_pool2d(y, [2, 2], [2, 2]))

    mod = _module(x.shape, body)
    backend = backend_of(spec)
    assert backend.vector_lanes(target_of(spec)) == 4
    assert sorted(_kernels(mod, target_of(spec), backend)) == ["conv2d_nchwc_float", "depthwise_nchwc_float"]
    lib = export(build_for(mod, spec), spec, tmp_path / "model.so")
    (out,) = qemu.run_under_qemu(lib, [x], cpu=spec.target["mcpu"], timeout=300)
    t = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w1), padding=1))
    t = torch.nn.functional.conv2d(t, torch.from_numpy(w2), stride=2, padding=1, groups=12)
    _close(out, torch.nn.functional.max_pool2d(t, 2, 2).numpy())


def test_symbolic_batch_keeps_the_blocked_kernels():
    """Calibration and evaluation builds keep the batch symbolic: the kernels must not fall back there."""
    n = tvm.tirx.Var("n", "int64")
    rng = np.random.default_rng(6)
    w = rng.standard_normal((32, 16, 3, 3)).astype("float32") * 0.2
    wd = rng.standard_normal((32, 1, 3, 3)).astype("float32") * 0.2

    def body(bb, v):
        y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(v, relax.const(w), padding=[1] * 4))))
        return bb.emit(relax.op.nn.conv2d(y, relax.const(wd), padding=[1] * 4, groups=32))

    mod = _module((n, 16, 12, 12), body)
    assert sorted(_kernels(mod)) == ["conv2d_nchwc_float", "depthwise_nchwc_float"]
    x = rng.standard_normal((3, 16, 12, 12)).astype("float32")
    t = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1))
    _close(_run(mod, x), torch.nn.functional.conv2d(t, torch.from_numpy(wd), padding=1, groups=32).numpy())
