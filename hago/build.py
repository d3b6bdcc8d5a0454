"""build: TVM target from the spec, compile a Relax module, export a library.

Everything device-specific comes from the spec: the target dict, the host
target for GPUs, and the cross compiler for boards. TVM's default Relax CPU
pipeline neither fuses nor schedules; ``build`` fuses (``hago.lower``), gives
hago's kernels their hand-written schedules and element-wise code a parallel,
vectorized one; tuned builds (MetaSchedule, cached records) replace that.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tvm
from tvm import relax

from .errors import BuildError
from .hwspec import HardwareSpec

log = logging.getLogger(__name__)


def target_of(spec: HardwareSpec) -> tvm.target.Target:
    """The TVM target of ``spec`` (with its host target where it has one)."""
    try:
        if spec.host:
            return tvm.target.Target(dict(spec.target), host=dict(spec.host))
        return tvm.target.Target(dict(spec.target))
    except Exception as e:  # TVM raises its own error types for bad target dicts
        raise BuildError(f"spec {spec.name}: TVM rejects target {spec.target}: {str(e).splitlines()[-1]}") from None


def is_local(spec: HardwareSpec) -> bool:
    """Whether builds for ``spec`` run on this machine (no cross compiler, no GPU)."""
    return spec.execution == "local" and not spec.cross_compiler


def host_target() -> tvm.target.Target:
    """This machine's CPU, detected by LLVM: where calibration and accuracy runs happen."""
    return tvm.target.Target.from_device(tvm.cpu())


def static_batch(mod: tvm.IRModule, batch: int) -> tvm.IRModule:
    """Bind the symbolic batch dimension of ``main``'s inputs to ``batch``.

    Deployment builds have a fixed batch, and the hand-scheduled integer
    kernels tile exact shapes, so builds are made static; the dynamic module
    stays the one strategies are keyed on.
    """
    names = set()
    for p in mod["main"].params:
        for d in p.ty.shape:
            if isinstance(d, tvm.tirx.Var):
                names.add(d.name)
    if not names:
        return mod
    return relax.transform.BindSymbolicVars({n: batch for n in names}, "main")(mod)


def build(mod: tvm.IRModule, target: tvm.target.Target, what: str = "target", tune=None):
    """Compile ``mod`` for ``target`` (hago's kernels get their default schedules first).

    ``tune`` (a :class:`hago.tune.TuneOptions`) tunes with MetaSchedule and a
    persistent per-(device, workload) database; with ``trials=0`` it only
    reuses cached records.
    """
    if target.kind.name == "cuda":
        from .cuda import build_cuda

        return build_cuda(mod, target)  # dlight for float, hand-scheduled dp4a kernels for int8
    if tune is not None:
        from .tune import build_tuned

        ex, stats = build_tuned(mod, target, tune)
        log.info("%s: %d new trials, %d/%d tasks from cache", what, stats.new_trials, stats.reused_tasks, stats.tasks)
        return ex
    from .kernels import schedule_vnni
    from .lower import finish, fuse

    try:
        # kernels first: schedule_vnni marks them opaque so fusion keeps them standalone
        return finish(fuse(schedule_vnni(mod, target), target), target)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise BuildError(f"TVM failed to build for {what}: {msg[-1] if msg else type(e).__name__}") from None


def export(executable, spec: HardwareSpec, path: str | Path) -> Path:
    """Write a shared library that ``tvm.runtime.load_module`` loads on the device."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.target.get("kind") == "cuda":
        from .cuda import export_cuda

        export_cuda(executable, path.parent)  # model.so plus kernels.cu, the source nvcc compiles on the host
        return path
    from .native_log import drop_native_lines

    try:
        with drop_native_lines():  # TVM's per-function "Scope Saving" notes
            if spec.cross_compiler:
                from tvm.support import cc

                executable.export_library(str(path), fcompile=cc.cross_compiler(spec.cross_compiler))
            else:
                executable.export_library(str(path))
    except Exception as e:
        raise BuildError(f"exporting {path.name} for {spec.name} failed: {str(e).strip().splitlines()[-1]}") from None
    return path


def load(path: str | Path, device=None):
    """Load an exported library into a VirtualMachine on ``device`` (CPU by default)."""
    lib = tvm.runtime.load_module(str(path))
    return relax.VirtualMachine(lib, device or tvm.cpu())
