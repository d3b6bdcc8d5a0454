"""The generic LLVM CPU backend: plain integer Relax ops, fused and scheduled by ``hago.lower``.

What every CPU backend shares, and all a CPU without hago kernels needs:
no plan beyond plain ops, no kernel swap, the build of :mod:`hago.lower`
(LegalizeOps/FuseOps/FuseTIR, then default element-wise and reduction
schedules; MetaSchedule records where ``tune`` asks for them) and an export
through the spec's cross compiler, if any. ``x86`` and ``arm`` subclass it
and add their kernels. The registry derives it for an LLVM target whose spec
lists no intrinsic another backend knows.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hago.errors import BuildError, error_line

from ..base import Backend

log = logging.getLogger(__name__)


class CPUBackend(Backend):
    """An LLVM CPU target (``x86-64``, ``aarch64``, anything LLVM compiles for), built on this machine."""

    target_kind = "llvm"
    generic = True
    device = "cpu"
    tunable = True

    #: ``platform.machine()`` names of each LLVM triple architecture (a board reports the former)
    MACHINES = {"x86_64": ("x86_64", "amd64"), "aarch64": ("aarch64", "arm64"), "arm": ("armv7l", "armv6l", "arm")}
    #: LLVM ``mattr`` features -> the /proc/cpuinfo flag that has them (x86 and ARM name them differently)
    mattr_flags: dict[str, str] = {}

    def board_arch(self, spec) -> str:
        """The architecture a build for ``spec`` runs on: its triple's, else this machine's (a local spec)."""
        import platform

        return str(spec.target.get("mtriple") or platform.machine()).split("-")[0].lower()

    def board_flags(self, spec) -> tuple[str, ...]:
        """The /proc/cpuinfo flags a build for ``spec`` executes (from its ``mattr``)."""
        return tuple(self.mattr_flags[a] for a in (spec.target.get("mattr") or []) if a in self.mattr_flags)

    def board_problem(self, spec, facts):
        """Another architecture, or a CPU without a flag the build executes (it would die with SIGILL)."""
        arch, machine = self.board_arch(spec), str(facts.get("machine", "")).lower()
        if machine not in self.MACHINES.get(arch, (arch,)):
            return f"is {machine or 'an unknown machine'}, the spec's builds are {arch}"
        have = set(facts.get("cpu_flags") or ())
        missing = [f for f in self.board_flags(spec) if f not in have]
        return f"lacks CPU flags {', '.join(missing)}" if missing and have else None

    def build(self, mod, target, *, what: str = "target", tune=None):
        """``hago.lower``'s CPU pipeline, with this backend's kernel schedules first; ``tune``: MetaSchedule records."""
        if tune is not None:
            from hago.tune import build_tuned

            ex, stats = build_tuned(mod, target, tune, backend=self)
            log.info("%s: %d new trials, %d/%d tasks from cache", what, stats.new_trials, stats.reused_tasks,
                     stats.tasks)
            return ex
        from hago.lower import finish, fuse

        try:
            # kernels first: their default schedules mark them opaque so fusion keeps them standalone
            return finish(fuse(self.schedule(mod, target), target, self), target, backend=self)
        except Exception as e:
            raise BuildError(f"TVM failed to build for {what}: {error_line(e, limit=None)}") from None

    # -- blocked float convolutions (float_layout, float_kernels, float_schedule) ----------
    def vector_lanes(self, target) -> int:
        """float32 lanes of the target's vector registers: the channel block of float convs (128-bit by default)."""
        return 4

    def vector_registers(self, target) -> int:
        """How many vector registers a register tile may use (AArch64 and AVX-512 have 32)."""
        return 32

    def prepare_fusion(self, mod, target):
        """Float convs in blocked ``NCHW{b}c`` layouts (:mod:`.float_layout`), attention's softmax as one
        kernel (:mod:`.row_kernels`), float dense layers laid out for their register tile (:mod:`.float_dense`)."""
        from .float_dense import float_dense_layouts
        from .float_layout import block_float_convs
        from .row_kernels import fuse_row_kernels

        lanes = self.vector_lanes(target)
        return fuse_row_kernels(block_float_convs(float_dense_layouts(mod, lanes), lanes), lanes)

    def legalizations(self, target) -> dict:
        """hago's blocked float conv kernels (:mod:`.float_kernels`) in place of TVM's generic loop nest."""
        import tvm

        from .float_kernels import legalize_conv2d

        default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
        return {"relax.nn.conv2d": legalize_conv2d(default)}

    def schedule_fused(self, sch, target) -> bool:
        """The register-tiled schedule of a fused blocked float conv (:mod:`.float_schedule`)."""
        from .float_schedule import schedule_float_kernels

        return schedule_float_kernels(sch, self.vector_registers(target))

    def export(self, executable, spec, path: Path) -> Path:
        """A shared library, linked by the spec's cross compiler when it has one (an ARM board)."""
        from hago.native_log import drop_native_lines

        try:
            with drop_native_lines():  # TVM's per-function "Scope Saving" notes
                if spec.cross_compiler:
                    from tvm.support import cc

                    executable.export_library(str(path), fcompile=cc.cross_compiler(spec.cross_compiler))
                else:
                    executable.export_library(str(path))
        except Exception as e:
            raise BuildError(f"exporting {path.name} for {spec.name} failed: {error_line(e, limit=None)}") from None
        return path
