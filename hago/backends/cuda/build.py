"""CUDA builds without a GPU: compile, read the generated source, check it with nvcc.

``build_cuda`` is ``tvm.compile`` with TVM's default CUDA pipeline (LegalizeOps,
FuseOps, then dlight's GPU rules ``Matmul``/``GEMV``/``Reduction``/
``GeneralReduction``/``Fallback`` for every kernel not yet scheduled), after
``apply_dp4a`` has replaced the integer conv2d/dense by pre-scheduled
``__dp4a`` kernels that dlight skips.

TVM 0.27 never compiles device code at build time: the module keeps the CUDA
*source*, and the runtime compiles it when a GPU host loads the library
(``tvm_callback_cuda_compile``, registered by ``import tvm``: NVRTC through the
``cuda-python`` bindings by default, nvcc under ``TVM_CUDA_COMPILE_MODE=nvcc``).
So a build proves nothing about the kernels compiling; ``nvcc_check`` does,
per architecture, with the local CUDA toolkit and no GPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm

from hago.errors import BuildError, error_line
from hago.lower import opaque_symbolic_helpers

from .dp4a import apply_dp4a

DP4A_MIN_SM = 61  # __dp4a exists from Pascal (sm_61) on


class NvccNotFound(BuildError):
    """No ``nvcc`` on PATH: CUDA sources cannot be checked on this machine."""


def sm_version(target: tvm.target.Target) -> int:
    """``sm_75`` -> 75; a CUDA target without ``arch`` raises BuildError."""
    arch = str(target.attrs.get("arch", ""))
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if m is None:
        raise BuildError(f"CUDA target {target} has no arch like 'sm_75'; add one to the spec's target")
    return int(m.group(1))


def build_cuda(mod: tvm.IRModule, target: tvm.target.Target, *, trials: int = 0, work_dir: str | None = None):
    """Compile a (realized or FP32) Relax module for a CUDA target; returns a ``relax.VMExecutable``.

    :func:`swap_dp4a` then :func:`compile_cuda`: what the cuda backend's
    rewrite and build do for a device build, in one call.

    Parameters
    ----------
    mod : tvm.IRModule
        Relax module; int8 x int8 -> int32 ``matmul``/``conv2d`` with constant
        weights get dp4a kernels (sm_61+), the rest dlight schedules.
    target : tvm.target.Target
        ``kind: cuda`` with ``arch`` and a host target.
    trials : int
        MetaSchedule trials. Tuning measures kernels, which needs a GPU on this
        host; not supported yet, so anything but 0 raises BuildError.
    work_dir : str, optional
        Reserved for the tuning database (unused while ``trials`` must be 0).
    """
    _check(target, trials)
    return compile_cuda(swap_dp4a(mod, target), target)


def _check(target: tvm.target.Target, trials: int) -> None:
    if target.kind.name != "cuda":
        raise BuildError(f"build_cuda needs a cuda target, got {target.kind.name}")
    if trials:
        raise BuildError(f"CUDA tuning (trials={trials}) needs a GPU to measure on; build untuned with trials=0")


def swap_dp4a(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` with its integer conv2d/dense on dp4a kernels where ``target`` has ``__dp4a`` (sm_61+)."""
    if sm_version(target) >= DP4A_MIN_SM:
        mod = apply_dp4a(mod)
    return mod


def compile_cuda(mod: tvm.IRModule, target: tvm.target.Target, *, trials: int = 0):
    """``tvm.compile`` with TVM's default CUDA pipeline (dlight schedules what is not yet scheduled).

    Helpers the ONNX importer emitted for the symbolic batch (einsum, tile)
    are kept out of fusion first, as on the CPU backends
    (:func:`hago.lower.opaque_symbolic_helpers`): FuseTIR cannot merge their
    ``[N, ...]`` buffers with a static-batch neighbour's.
    """
    _check(target, trials)
    try:
        with target:
            return tvm.compile(opaque_symbolic_helpers(mod), target=target)
    except Exception as e:  # TVM raises its own error types
        detail = error_line(e, limit=None)
        raise BuildError(f"TVM failed to build for cuda {target.attrs.get('arch')}: {detail}") from None


def _device_modules(mod):
    """Every module under ``mod`` (depth first), without ``hasattr`` (it raises on CUDA modules)."""
    for sub in mod.imports:
        yield sub
        yield from _device_modules(sub)


def cuda_source(executable) -> str:
    """The CUDA C++ source TVM generated for ``executable`` (all kernels in one translation unit)."""
    lib = getattr(executable, "mod", executable)
    for sub in _device_modules(lib):
        if sub.kind == "cuda":
            return sub.inspect_source("cuda")
    raise BuildError("the executable has no CUDA module (was it built for a cuda target?)")


# a kernel definition (TVM also emits a declaration, ending in ';', before each)
_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^)]*\)\s*\{')


def kernel_sources(source: str) -> dict[str, str]:
    """``{kernel name: its definition}`` from a TVM CUDA source, each up to the next kernel."""
    found = list(_KERNEL.finditer(source))
    ends = [m.start() for m in found[1:]] + [len(source)]
    return {m.group(1): source[m.start():end] for m, end in zip(found, ends)}


def nvcc_check(source: str, arch: str) -> None:
    """Compile ``source`` with ``nvcc -arch=<arch> -c``; BuildError with nvcc's first error on failure.

    Raises :class:`NvccNotFound` (a BuildError) where nvcc is not on PATH.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise NvccNotFound("nvcc not found on PATH: install the CUDA toolkit to check CUDA sources")
    with tempfile.TemporaryDirectory(prefix="hago_nvcc_") as tmp:
        cu, obj = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.o"
        cu.write_text(source)
        try:
            r = subprocess.run([nvcc, f"-arch={arch}", "-c", str(cu), "-o", str(obj)],
                               capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise BuildError(f"nvcc -arch={arch} timed out after 600 s") from None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        first = next((ln for ln in lines if "error" in ln), lines[0] if lines else f"exit {r.returncode}")
        raise BuildError(f"nvcc -arch={arch} rejects the generated CUDA source: {first.strip()}")


def export_cuda(executable, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``model.so`` and ``kernels.cu`` (its CUDA source) under ``out_dir``; returns both paths.

    ``model.so`` carries the source, not a cubin: the GPU host's TVM compiles it
    on load (see the module docstring), so that host needs NVRTC or nvcc.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    so, cu = out / "model.so", out / "kernels.cu"
    try:
        executable.export_library(str(so))
    except Exception as e:
        raise BuildError(f"exporting {so.name} failed: {error_line(e, limit=None)}") from None
    cu.write_text(cuda_source(executable))
    return so, cu
