"""build: TVM target from the spec, compile a Relax module, export a library.

Everything device-specific comes from the spec and its backend
(:mod:`hago.backends`): the target dict, the host target for GPUs, the
cross compiler for boards, the kernel swap, the schedules and the export.
TVM's default Relax CPU pipeline neither fuses nor schedules; a CPU
backend's build fuses (``hago.lower``), gives hago's kernels their
hand-written schedules and element-wise code a parallel, vectorized one;
tuned builds (MetaSchedule, cached records) replace that.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tvm
from tvm import relax

from . import backends
from .errors import BuildError, error_line
from .hwspec import HardwareSpec

log = logging.getLogger(__name__)


def target_of(spec: HardwareSpec) -> tvm.target.Target:
    """The TVM target of ``spec`` (with its host target where it has one)."""
    try:
        if spec.host:
            return tvm.target.Target(dict(spec.target), host=dict(spec.host))
        return tvm.target.Target(dict(spec.target))
    except Exception as e:  # TVM raises its own error types for bad target dicts
        raise BuildError(f"spec {spec.name}: TVM rejects target {spec.target}: {error_line(e, limit=None)}") from None


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


def build(mod: tvm.IRModule, target: tvm.target.Target, what: str = "target", tune=None,
          backend: backends.Backend | None = None):
    """Compile ``mod`` for ``target`` (hago's kernels get their default schedules first).

    ``backend`` builds it when it builds for ``target``'s kind (a spec's
    backend, for its device or, on a CPU, for this machine); otherwise the
    backend that claims ``target`` (:func:`hago.backends.for_target`). No
    kernel swap here: that is :func:`build_for`'s, for the device. ``tune``
    (a :class:`hago.tune.TuneOptions`) tunes with MetaSchedule and a
    persistent per-(device, workload) database; with ``trials=0`` it only
    reuses cached records.
    """
    if backend is None or backend.target_kind != target.kind.name:
        backend = backends.for_target(target)
    return backend.build(mod, target, what=what, tune=tune)


def device_module(mod: tvm.IRModule, spec: HardwareSpec) -> tvm.IRModule:
    """``mod`` with its backend's kernel swap (ARM's sdot kernels, CUDA's dp4a ones): what the device build
    compiles, and where the weights have the form they ship in (4-bit ones packed two per byte)."""
    return backends.backend_of(spec).rewrite(mod, spec, target_of(spec))


def build_for(mod: tvm.IRModule, spec: HardwareSpec, what: str | None = None, tune=None, *,
              rewritten: bool = False):
    """The device build of ``mod`` for ``spec``: its backend's kernel swap (unless ``rewritten``: ``mod`` is
    :func:`device_module`'s already), then its build for the spec's target."""
    backend = backends.backend_of(spec)
    target = target_of(spec)
    if not rewritten:
        mod = backend.rewrite(mod, spec, target)
    return backend.build(mod, target, what=what or spec.name, tune=tune)


def export(executable, spec: HardwareSpec, path: str | Path) -> Path:
    """Write a shared library that ``tvm.runtime.load_module`` loads on the device (the backend's export)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return backends.backend_of(spec).export(executable, spec, path)


def load(path: str | Path, device=None):
    """Load an exported library into a VirtualMachine on ``device`` (CPU by default)."""
    lib = tvm.runtime.load_module(str(path))
    return relax.VirtualMachine(lib, device or tvm.cpu())
