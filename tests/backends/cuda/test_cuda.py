"""CUDA builds for cuda-t4 (sm_75) and cuda-h100 (sm_90), checked without a GPU.

What can be checked here: the dp4a kernels' arithmetic (the same kernels,
unscheduled, run on the CPU and match the naive integer program bit for bit);
that every integer conv2d/dense of a real model lands on a ``__dp4a`` kernel;
and that ``nvcc`` compiles the generated source for the spec's architecture.
Whether the kernels run correctly and fast on the GPU needs a GPU (not here).
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

from hago import zoo
from hago.build import target_of
from hago.compiler import quantize
from hago.backends.cuda.build import build_cuda, cuda_source, export_cuda, kernel_sources, nvcc_check
from hago.backends.cuda.dp4a import KERNEL_PREFIX, apply_dp4a, conv2d_kernel, dense_kernel
from hago.errors import BuildError
from hago.hwspec import HardwareSpec

SPECS = {"cuda-t4": "sm_75", "cuda-h100": "sm_90"}
CPU = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}
pytestmark = pytest.mark.llvm  # calibration and the arithmetic checks run on this CPU
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")


def _resnet_block():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int = 16):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + x)

    torch.manual_seed(0)
    block = Block()
    with torch.no_grad():  # non-trivial BN statistics, so folding changes the weights
        for bn in (block.bn1, block.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return block.eval()


@pytest.fixture(scope="module")
def quantized(mnist_model):
    """``{(model, spec): Quantized}`` for the MNIST CNN and a ResNet basic block on both CUDA specs."""
    import torch

    x_mnist = zoo.mnist_data("train")[0][:256]
    block = _resnet_block()
    x_block = np.random.default_rng(0).standard_normal((64, 16, 16, 16)).astype(np.float32)
    out = {}
    for spec in SPECS:
        out["mnist", spec] = quantize(mnist_model, spec, {"input": x_mnist}, calibrator="mse",
                                      example_inputs=(torch.from_numpy(x_mnist[:1]),))
        out["resnet_block", spec] = quantize(block, spec, {"x": x_block}, calibrator="mse",
                                             example_inputs=(torch.from_numpy(x_block[:1]),))
    return out


@pytest.fixture(scope="module")
def builds(quantized, tmp_path_factory):
    """``{(model, spec): (int executable, fp32 executable, export dir)}``."""
    out = {}
    for (model, spec), q in quantized.items():
        target = target_of(HardwareSpec.load(spec))
        ex = build_cuda(q.realized.mod, target)
        fp32 = build_cuda(q.fp32, target)
        d = tmp_path_factory.mktemp(f"{model}_{spec}")
        export_cuda(ex, d)
        out[model, spec] = (ex, fp32, d)
    return out


def _integer_ops(mod: tvm.IRModule) -> list[str]:
    """Op names of the int32-accumulating matmul/conv2d calls in ``main``."""
    ops = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name in (
                "relax.matmul", "relax.nn.conv2d") and str(getattr(e.attrs, "out_dtype", "")) == "int32":
            ops.append(e.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return ops


# ---- no CUDA build needed -------------------------------------------------------
def _run_cpu(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(CPU)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("model", ["mnist", "resnet_block"])
def test_dp4a_rewrite_is_bit_exact_on_cpu(quantized, model):
    """The dp4a kernels' loop nests (unscheduled, on the CPU) reproduce the integer program exactly."""
    q = quantized[model, "cuda-t4"]
    rewritten = apply_dp4a(q.realized.mod, schedule=False)
    assert not _integer_ops(rewritten), "an integer conv/dense was left out"
    shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else 3 for d in q.fp32["main"].params[0].ty.shape.values]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(_run_cpu(rewritten, x), _run_cpu(q.realized.mod, x))


CONV_CASES = [
    # x shape NCHW (batch from the call), w OIHW, strides, padding (t, l, b, r), dilation
    ((2, 3, 11, 9), (20, 3, 3, 3), (2, 2), (1, 0, 2, 1), (1, 1)),  # K = 27, O = 20: both ragged
    ((1, 8, 10, 10), (70, 8, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),  # O beyond one 64 tile
    ((3, 5, 12, 12), (16, 5, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),  # dilation
]
DENSE_CASES = [(1, 3136, 128), (70, 30, 10), (129, 64, 65)]  # m, k, n


def test_static_batch_build(quantized):
    """Deployment builds may bind the batch: dense tiles then fit it, and results stay exact."""
    mod = quantized["mnist", "cuda-t4"].realized.mod
    names = {d.name for p in mod["main"].params for d in p.ty.shape if isinstance(d, tvm.tirx.Var)}
    mod = relax.transform.BindSymbolicVars({n: 2 for n in names}, "main")(mod)
    x = zoo.mnist_data("test")[0][:2]
    np.testing.assert_array_equal(_run_cpu(apply_dp4a(mod, schedule=False), x), _run_cpu(mod, x))
    kernels = kernel_sources(cuda_source(build_cuda(mod, target_of(HardwareSpec.load("cuda-t4")))))
    dense = [k for k in kernels if k.startswith(KERNEL_PREFIX + "dense")]
    assert dense and all(k.endswith("_m_2_kernel") and "__dp4a(" in kernels[k] for k in dense)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_kernel_arithmetic(case):
    xs, ws, strides, padding, dilation = case
    rng = np.random.default_rng(sum(xs) + sum(ws))
    x = rng.integers(-128, 128, xs, dtype=np.int8)
    w = rng.integers(-128, 128, ws, dtype=np.int8)
    f = conv2d_kernel((None, *xs[1:]), ws, strides, padding, dilation, "conv", schedule=False)
    ref = _np_conv2d(x, w, strides, padding, dilation)
    out = np.zeros((xs[0], ws[0], ref.shape[2] * ref.shape[3]), np.int32)
    _run_prim(f, x, w.reshape(ws[0], -1), out)
    np.testing.assert_array_equal(out.reshape(ref.shape), ref)


@pytest.mark.parametrize("m,k,n", DENSE_CASES)
def test_dense_kernel_arithmetic(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x, w = rng.integers(-128, 128, (m, k), dtype=np.int8), rng.integers(-128, 128, (k, n), dtype=np.int8)
    out = np.zeros((m, n), np.int32)
    _run_prim(dense_kernel(k, n, "dense", schedule=False), x, np.ascontiguousarray(w.T), out)
    np.testing.assert_array_equal(out, (x.astype(np.int64) @ w.astype(np.int64)).astype(np.int32))


def test_scheduled_kernels_build_for_odd_shapes():
    """Every arithmetic case above, scheduled for sm_75: tensorized and compiled to CUDA."""
    funcs = {f"conv{i}": conv2d_kernel((None, *c[0][1:]), *c[1:], f"conv{i}") for i, c in enumerate(CONV_CASES)}
    funcs.update({f"dense{i}": dense_kernel(k, n, f"dense{i}") for i, (_, k, n) in enumerate(DENSE_CASES)})
    funcs["dense_n1_k1"] = dense_kernel(1, 1, "dense_n1_k1")
    lib = tvm.tirx.build(tvm.IRModule(funcs), target=target_of(HardwareSpec.load("cuda-t4")))
    kernels = kernel_sources(lib.imports[0].inspect_source("cuda"))
    assert sorted(kernels) == sorted(f"{name}_kernel" for name in funcs)
    assert all("__dp4a(" in body for body in kernels.values())


def test_ops_without_a_dp4a_kernel_are_left_to_dlight():
    """A depthwise conv has no dp4a kernel yet: it stays a plain conv2d and still builds."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("n", "int64"), 8, 10, 10], "int8"))
    w = relax.const(np.ones((8, 1, 3, 3), np.int8))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, w, groups=8, out_dtype="int32"))
        bb.emit_func_output(y)
    mod = bb.get()
    assert _integer_ops(apply_dp4a(mod)) == ["relax.nn.conv2d"]
    kernels = kernel_sources(cuda_source(build_cuda(mod, target_of(HardwareSpec.load("cuda-t4")))))
    assert not any(k.startswith(KERNEL_PREFIX) for k in kernels)


def _run_prim(func, *arrays):
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=tvm.target.Target(CPU))
    ts = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*ts)
    arrays[-1][...] = ts[-1].numpy()


def _np_conv2d(x, w, strides, padding, dilation):
    pt, pl, pb, pr = padding
    x = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h - (kh - 1) * dh - 1) // sh + 1, (wd - (kw - 1) * dw - 1) // sw + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.int64))
    return out.astype(np.int32)


def test_kernel_sources_splits_definitions():
    src = ('extern "C" __global__ void __launch_bounds__(64) a_kernel(int* x);\n'
           'extern "C" __global__ void __launch_bounds__(64) a_kernel(int* x) {\n  x[0] = 1;\n}\n\n'
           'extern "C" __global__ void b_kernel(int* y) {\n  y[0] = 2;\n}\n')
    ks = kernel_sources(src)
    assert list(ks) == ["a_kernel", "b_kernel"]
    assert "x[0] = 1" in ks["a_kernel"] and "y[0]" not in ks["a_kernel"]


def test_build_cuda_refuses_cpu_targets_and_tuning():
    mod = tvm.IRModule()
    with pytest.raises(BuildError, match="cuda target"):
        build_cuda(mod, tvm.target.Target(CPU))
    with pytest.raises(BuildError, match="GPU"):
        build_cuda(mod, target_of(HardwareSpec.load("cuda-t4")), trials=8)


@needs_nvcc
def test_nvcc_check_reports_one_line():
    with pytest.raises(BuildError) as e:
        nvcc_check("__global__ void k() { undefined_thing(); }\n", "sm_75")
    assert "\n" not in str(e.value) and "sm_75" in str(e.value)


# ---- CUDA builds (no GPU: source and nvcc only) ----------------------------------
CASES = [(m, s) for m in ("mnist", "resnet_block") for s in SPECS]


@pytest.mark.parametrize("model,spec", CASES)
def test_every_integer_conv_and_dense_uses_dp4a(quantized, builds, model, spec):
    ex, _, out_dir = builds[model, spec]
    kernels = kernel_sources(cuda_source(ex))
    dp4a = {k: body for k, body in kernels.items() if k.startswith(KERNEL_PREFIX)}
    # one kernel per distinct (op, shape), and one VM call of such a kernel per int32 conv2d/matmul
    n_ops = len(_integer_ops(quantized[model, spec].realized.mod))
    assert n_ops and 1 <= len(dp4a) <= n_ops
    calls = re.findall(rf"^\s*call\s+{KERNEL_PREFIX}\w+", ex.as_text(), flags=re.M)
    assert len(calls) == n_ops
    kinds = {"relax.nn.conv2d": "conv2d", "relax.matmul": "dense"}
    for op in set(_integer_ops(quantized[model, spec].realized.mod)):
        assert any(k.startswith(KERNEL_PREFIX + kinds[op]) for k in dp4a), f"no dp4a kernel for {op}"
    for name, body in dp4a.items():
        assert "__dp4a(" in body, f"{name} has no __dp4a"
    # nothing integer left to dlight: those kernels would be named after the op
    assert not [k for k in kernels if k not in dp4a and re.search("conv2d|matmul", k)]
    assert (out_dir / "model.so").stat().st_size > 0
    assert (out_dir / "kernels.cu").read_text() == cuda_source(ex)


@needs_nvcc
@pytest.mark.parametrize("model,spec", CASES)
def test_nvcc_compiles_integer_build(builds, model, spec):
    nvcc_check(cuda_source(builds[model, spec][0]), SPECS[spec])


@needs_nvcc
@pytest.mark.parametrize("model,spec", CASES)
def test_nvcc_compiles_fp32_build(builds, model, spec):
    src = cuda_source(builds[model, spec][1])
    kernels = kernel_sources(src)
    assert any("conv2d" in k for k in kernels) and not any("__dp4a(" in body for body in kernels.values())
    nvcc_check(src, SPECS[spec])


INT4_CASES = [((2, 5, 9, 7), (6, 5, 3, 3), (2, 1), (1, 0, 1, 2), (1, 1)), ((1, 16, 8, 8), (32, 16, 1, 1), (1, 1),
                                                                           (0, 0, 0, 0), (1, 1))]


def test_packed_4bit_kernels_arithmetic():
    """4-bit weights ship two per byte and are unpacked into 16x the weights on the way to shared memory; the int32
    sums, shifted back, equal the int8 reference exactly (unscheduled kernels, run on this CPU)."""
    from hago.backends.cuda.dp4a import pack_rows_int4

    rng = np.random.default_rng(7)
    for i, (xs, ws, strides, padding, dilation) in enumerate(INT4_CASES):
        x = rng.integers(-128, 128, xs, dtype=np.int8)
        w = rng.integers(-8, 8, ws, dtype=np.int8)
        w.flat[:2] = (-8, 7)
        packed = pack_rows_int4(w.reshape(ws[0], -1))
        assert packed.dtype == np.uint8 and packed.shape == (ws[0], -(-int(np.prod(ws[1:])) // 8) * 4)
        f = conv2d_kernel((None, *xs[1:]), ws, strides, padding, dilation, f"conv{i}", schedule=False, int4=True)
        ref = _np_conv2d(x, w, strides, padding, dilation)
        out = np.zeros((xs[0], ws[0], ref.shape[2] * ref.shape[3]), np.int32)
        _run_prim(f, x, packed, out)
        np.testing.assert_array_equal(out.reshape(ref.shape), ref)
    m, k, n = 3, 100, 10
    x, w = rng.integers(-128, 128, (m, k), dtype=np.int8), rng.integers(-8, 8, (k, n), dtype=np.int8)
    out = np.zeros((m, n), np.int32)
    _run_prim(dense_kernel(k, n, "dense", schedule=False, int4=True), x, pack_rows_int4(np.ascontiguousarray(w.T)),
              out)
    np.testing.assert_array_equal(out, (x.astype(np.int64) @ w.astype(np.int64)).astype(np.int32))


def test_packed_4bit_kernels_compile_for_t4_with_dp4a_on_half_the_bytes():
    """Scheduled for sm_75: the weight is read as bytes (two weights each), unpacked with a shift and a mask,
    multiplied by ``__dp4a`` and shifted back by 4."""
    funcs = {f"conv{i}": conv2d_kernel((None, *c[0][1:]), *c[1:], f"conv{i}", int4=True)
             for i, c in enumerate(INT4_CASES)}
    funcs["dense"] = dense_kernel(100, 10, "dense", int4=True)
    lib = tvm.tirx.build(tvm.IRModule(funcs), target=target_of(HardwareSpec.load("cuda-t4")))
    kernels = kernel_sources(lib.imports[0].inspect_source("cuda"))
    assert sorted(kernels) == sorted(f"{name}_kernel" for name in funcs)
    for body in kernels.values():
        assert "__dp4a(" in body and "uchar* __restrict__ w_ptr" in body and ">> 4" in body, body[:400]
    if shutil.which("nvcc"):  # the generated source compiles for the T4
        nvcc_check(lib.imports[0].inspect_source("cuda"), SPECS["cuda-t4"])


def test_4bit_mnist_rewrite_is_packed_and_bit_exact_on_cpu(mnist_model):
    """W4A8 for cuda-t4: every integer conv/dense gets a packed 4-bit dp4a kernel, exact against the program."""
    import torch

    from hago.annotate import AnnotateConfig
    from hago.weight_bytes import weight_bytes

    x = zoo.mnist_data("train")[0][:64]
    q = quantize(mnist_model, "cuda-t4", {"input": x}, calibrator="mse", example_inputs=(torch.from_numpy(x[:1]),),
                 annotate_config=AnnotateConfig(weight_bits=4))
    rewritten = apply_dp4a(q.realized.mod, schedule=False)
    names = [gv.name_hint for gv in rewritten.get_global_vars() if gv.name_hint.startswith(KERNEL_PREFIX)]
    assert names and all(n.endswith("_int4") for n in names) and not _integer_ops(rewritten)
    assert weight_bytes(rewritten) <= 0.55 * weight_bytes(q.realized.mod)
    np.testing.assert_array_equal(_run_cpu(rewritten, x[:3]), _run_cpu(q.realized.mod, x[:3]))
