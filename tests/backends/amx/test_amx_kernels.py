"""AMX dense kernels (``tdpbusd`` / ``tdpbf16ps``): numbers, instructions, and the Linux permission.

* int8 (u8 x s8 -> s32) is bit-exact against numpy's int32 matmul.
* bf16 is compared with a numpy reference on the bf16-rounded inputs
  (``ml_dtypes``, nearest even) summed in float64. Products of bf16 values
  are exact in fp32, so the kernel differs only by the order and fp32
  rounding of its additions: the tolerance is ``RTOL * (sum|x*w| + |bias|)``
  per output with ``RTOL = 1e-5`` (rounding of a K-long fp32 sum grows like
  ``sqrt(K) * 2**-24``, ~2.3e-6 for K = 1536; measured below 1e-7). A wrong
  layout, a truncating rounding or a lost K step misses by far more
  (one product is ~1/K of the sum, a truncated input ~2**-9 of it).
* A library exported from hago and loaded by a fresh process that never
  asked Linux for AMX: the kernel asks itself and runs; a kernel built
  without that request dies with SIGILL (what any AMX code does there); and
  where Linux refuses (a seccomp filter makes ``arch_prctl`` fail) the call
  raises a one-line ``RuntimeError`` instead of crashing.

Every case of a dtype is one Relax module, so the file pays two builds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from hago.backends.amx.amx_ir import micro_kernel_ir, tile_config
from hago.backends.amx.dense import (PERMISSION_MESSAGE, col_tiles, emit_dense_amx, k_pad, pack_dense_weight,
                                     row_tiles, task_grid, to_bf16)
from hago.backends.amx.permission import amx_available, missing_cpu_flags, request_amx

AMX_MISSING = amx_available()  # also asks Linux for the permission this process needs to run the kernels
needs_amx = pytest.mark.skipif(AMX_MISSING is not None, reason=AMX_MISSING or "")

TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
RTOL = 1e-5
# name -> (x shape, N, threads): M = 1, 128, ragged M/N/K, batched, one column tile, K below one step
INT8 = {
    "1x512x1000": ((1, 512), 1000, 2),
    "128x384x1536": ((128, 384), 1536, 2),
    "7x100x30": ((7, 100), 30, 2),
    "33x64x17_3tasks": ((33, 64), 17, 3),  # M padded 33 -> 64, one column block, 3 tasks on 2 row blocks
    "batched_2x3x64x40": ((2, 3, 64), 40, 2),
    "20x64x16": ((20, 64), 16, 2),  # N fits one tile: 2x1 kernel
    "16x8x48": ((16, 8), 48, 2),  # K 8 -> 64, N 48 = one full and one ragged block
}
# name -> (x shape, N, bias)
BF16 = {
    "1x512x1000": ((1, 512), 1000, True),
    "128x384x1536": ((128, 384), 1536, False),
    "7x100x30": ((7, 100), 30, True),
    "33x63x17": ((33, 63), 17, True),  # K odd
    "batched_2x3x64x40": ((2, 3, 64), 40, False),
}


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)))


def _build(cases: dict, dtype: str):
    """One Relax module with every case as an output, built by hago's x86 backend; (vm, executable, inputs, weights)."""
    import tvm
    from tvm import relax

    from hago.backends.registry import get_backend

    bb = relax.BlockBuilder()
    xdtype = "uint8" if dtype == "int8" else "float32"
    xs = {name: relax.Var(f"x_{i}", relax.TensorType(c[0], xdtype)) for i, (name, c) in enumerate(cases.items())}
    inputs, weights = {}, {}
    with bb.function("main", list(xs.values())):
        with bb.dataflow():
            outs = []
            for name, (xshape, n, extra) in cases.items():
                rng, k = _rng(name), xshape[-1]
                if dtype == "int8":
                    inputs[name] = rng.integers(0, 256, xshape, dtype=np.uint8)
                    weights[name] = (rng.integers(-128, 128, (k, n), dtype=np.int8), None)
                    outs.append(emit_dense_amx(bb, xs[name], weights[name][0], "int8", threads=extra))
                else:
                    inputs[name] = rng.standard_normal(xshape).astype(np.float32)
                    bias = rng.standard_normal(n).astype(np.float32) if extra else None
                    weights[name] = (rng.standard_normal((k, n)).astype(np.float32), bias)
                    outs.append(emit_dense_amx(bb, xs[name], weights[name][0], "bf16", bias=bias, threads=2))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    target = tvm.target.Target(TARGET)
    with target:
        ex = get_backend("x86").build(bb.get(), target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    results = vm["main"](*[tvm.runtime.tensor(inputs[name]) for name in cases])
    return {name: results[i].numpy() for i, name in enumerate(cases)}, ex, inputs, weights


@pytest.fixture(scope="module")
def int8_run():
    return _build(INT8, "int8")


@pytest.fixture(scope="module")
def bf16_run():
    return _build(BF16, "bf16")


def _asm(ex) -> str:
    return ex.mod.imports[0].inspect_source("asm")


# ---- no AMX needed ----------------------------------------------------------------
def test_tile_config_layout():
    cfg = tile_config(2, 2, 16)
    assert len(cfg) == 64 and cfg[0] == 1  # palette 1
    assert [int.from_bytes(cfg[16 + 2 * t:18 + 2 * t], "little") for t in range(8)] == [64] * 8
    assert list(cfg[48:56]) == [16] * 8
    cfg = tile_config(1, 2, 7)  # A tmm0, B tmm2-3, C tmm4-5; tmm1, tmm6, tmm7 off
    assert list(cfg[48:56]) == [7, 0, 16, 16, 7, 7, 0, 0]
    assert int.from_bytes(cfg[18:20], "little") == 0


def test_micro_kernel_ir_names_the_tile_instructions():
    ir = micro_kernel_ir("int8", 2, 2, 16)
    assert ir.count("call void @llvm.x86.tdpbusd(") == 4 and "llvm.x86.ldtilecfg" in ir
    assert micro_kernel_ir("bf16", 1, 2, 3).count("call void @llvm.x86.tdpbf16ps(") == 2
    with pytest.raises(ValueError):
        micro_kernel_ir("int8", 3, 2, 16)


def test_tiling_plan():
    assert row_tiles(1) == (1, 1, 1) and row_tiles(16) == (1, 16, 16) and row_tiles(33) == (2, 16, 64)
    assert col_tiles(16) == 1 and col_tiles(17) == 2
    assert k_pad(100, "int8") == 128 and k_pad(100, "bf16") == 128 and k_pad(63, "bf16") == 64
    assert task_grid(4, 48, 2) == (1, 2)  # split the columns: each task reads half of B
    assert task_grid(98, 1, 2) == (2, 1)
    assert task_grid(4, 12, 16) == (4, 4)  # 16 tasks of 3 blocks beat 12 of 4


def test_weight_packing_is_the_tile_order():
    w = np.arange(70 * 20).reshape(70, 20) % 251 - 125
    p = pack_dense_weight(w.astype(np.int8), "int8")
    assert p.shape == (2, 32, 16, 4)  # N 20 -> 32, K 70 -> 128: [N/16][K/4][16][4]
    k, n = 65, 19
    assert p[n // 16, k // 4, n % 16, k % 4] == np.int8(w[k, n])
    assert p[1, :, 4:].max() == 0 and p[:, 18:].max() == 0  # padding is zero
    b = pack_dense_weight(w.astype(np.float32) / 7, "bf16")
    assert b.dtype == ml_dtypes.bfloat16 and b.shape == (2, 48, 16, 2)  # K 70 -> 96: 32 bf16 a row
    assert b[n // 16, k // 2, n % 16, k % 2] == to_bf16(np.float32(w[k, n] / 7))


def test_missing_cpu_flags():
    assert missing_cpu_flags("flags\t: fpu amx_tile amx_int8\n") == ["amx_bf16"]
    assert missing_cpu_flags("processor: 0\n") == ["amx_tile", "amx_int8", "amx_bf16"]


# ---- AMX ---------------------------------------------------------------------------
@needs_amx
def test_permission_is_idempotent():
    assert request_amx() and request_amx() and amx_available() is None


@needs_amx
@pytest.mark.parametrize("name", list(INT8))
def test_int8_bit_exact(int8_run, name):
    results, _, inputs, weights = int8_run
    x, w = inputs[name], weights[name][0]
    ref = (x.reshape(-1, x.shape[-1]).astype(np.int32) @ w.astype(np.int32)).reshape(*x.shape[:-1], w.shape[1])
    assert results[name].dtype == np.int32
    np.testing.assert_array_equal(results[name], ref)


@needs_amx
@pytest.mark.parametrize("name", list(BF16))
def test_bf16_matches_rounded_reference(bf16_run, name):
    results, _, inputs, weights = bf16_run
    (w, bias), x = weights[name], inputs[name]
    xr = to_bf16(x.reshape(-1, x.shape[-1])).astype(np.float64)
    wr = to_bf16(w).astype(np.float64)
    ref, scale = xr @ wr, np.abs(xr) @ np.abs(wr)
    if bias is not None:
        ref, scale = ref + bias, scale + np.abs(bias)
    got = results[name].reshape(ref.shape)
    assert results[name].dtype == np.float32
    err = np.abs(got - ref) / scale
    assert err.max() < RTOL, f"{name}: max relative error {err.max():.3g}"
    # the inputs really were rounded: the unrounded fp32 product is further away than the tolerance
    exact = x.reshape(-1, x.shape[-1]).astype(np.float64) @ w.astype(np.float64)
    assert (np.abs(exact + (0 if bias is None else bias) - got) / scale).max() > 10 * RTOL


@needs_amx
def test_assembly_has_tile_instructions(int8_run, bf16_run):
    for ex, instr in ((int8_run[1], "tdpbusd"), (bf16_run[1], "tdpbf16ps")):
        asm = _asm(ex)
        for needed in (instr, "tileloadd", "tilestored", "ldtilecfg", "tilerelease"):
            assert needed in asm, f"{needed} missing from the {instr} build"
        assert "hago_amx_" + ("int8" if instr == "tdpbusd" else "bf16") not in asm.replace(".Lhago", "")  # inlined


# ---- a deployed library in a fresh process ---------------------------------------------
_RUN_LIBRARY = textwrap.dedent("""
    import sys
    import numpy as np
    import tvm
    from tvm import relax
    assert tvm.get_global_func("runtime.NumThreads")() == 2  # worker threads run tiles too
    vm = relax.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
    x = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    print(vm["main"](tvm.runtime.tensor(x)).numpy().sum())
    assert "hago" not in sys.modules
""")

_DENY_AMX_C = r"""
/* Runs argv[1..] under a seccomp filter that refuses arch_prctl(ARCH_REQ_XCOMP_PERM, ...) with EPERM. */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
  struct sock_filter f[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_arch_prctl, 0, 3),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0x1023, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {sizeof(f) / sizeof(f[0]), f};
  if (argc < 2 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
    perror("seccomp");
    return 125;
  }
  execv(argv[1], argv + 1);
  perror("execv");
  return 126;
}
"""


def _export(tmp: Path, request_permission: bool) -> Path:
    import tvm
    from tvm import relax

    from hago.backends.registry import get_backend

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, 64), "uint8"))  # 2 x 2 blocks: one task per thread
    with bb.function("main", [x]):
        with bb.dataflow():
            w = np.ones((64, 64), np.int8)
            out = bb.emit_output(emit_dense_amx(bb, x, w, "int8", threads=2, request_permission=request_permission))
        bb.emit_func_output(out)
    target = tvm.target.Target(TARGET)
    with target:
        ex = get_backend("x86").build(bb.get(), target)
    path = tmp / f"model_{'asks' if request_permission else 'silent'}.so"
    ex.export_library(str(path))
    return path


def _run_fresh(path: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    script = path.parent / "run_library.py"
    script.write_text(_RUN_LIBRARY)
    cmd = [*(launcher or []), sys.executable, str(script), str(path)]
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("amx_so")
    return tmp, _export(tmp, True), _export(tmp, False)


EXPECTED_SUM = str(int((np.arange(64 * 64) % 256).sum()) * 64)  # all-ones weights: row sums x 64 columns


@needs_amx
def test_fresh_process_kernel_asks_for_amx_itself(libraries):
    _, asks, _ = libraries
    r = _run_fresh(asks)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [EXPECTED_SUM]


@needs_amx
def test_fresh_process_without_permission_dies_with_sigill(libraries):
    """What the in-kernel request prevents: AMX code in a process Linux gave no tile state."""
    _, _, silent = libraries
    r = _run_fresh(silent)
    assert r.returncode == -signal.SIGILL, (r.returncode, r.stderr[-2000:])


@needs_amx
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the seccomp launcher")
def test_refused_permission_is_a_one_line_error(libraries):
    tmp, asks, _ = libraries
    src = tmp / "deny_amx.c"
    src.write_text(_DENY_AMX_C)
    launcher = tmp / "deny_amx"
    subprocess.run(["gcc", "-O2", str(src), "-o", str(launcher)], check=True, capture_output=True)
    r = _run_fresh(asks, [str(launcher)])
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"RuntimeError: {PERMISSION_MESSAGE}"
