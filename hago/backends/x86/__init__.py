"""The x86 backend: VNNI and depthwise kernels, the blocked NCHW16c layout, their default schedules.

- :mod:`.plan`: which integer layer gets a hand-scheduled kernel, and where
  activations stay blocked (what realize reads);
- :mod:`.kernels`: the emitters (:mod:`.vnni`, :mod:`.depthwise`,
  :mod:`.depthwise_blocked`), the requantize epilogue (:mod:`.epilogue`) and
  the intrinsics (:mod:`.vnni_intrin`);
- :mod:`.schedules`: the registry of the kernels' default schedules and
  ``schedule_vnni``, used by the build and by ``hago.tune``.

Any x86 LLVM CPU: without ``avx512vnni`` (AVX2 specs) only the depthwise
kernel is scheduled, the VNNI ones are never planned (their descriptors name
no VNNI layout). Importing this package imports no TVM.
"""

from __future__ import annotations

import platform

from ..cpu import CPUBackend

#: weight layouts (spec descriptor ``weight_layout``) served by the VNNI kernels
VNNI_WEIGHT_LAYOUTS = ("OIHW4i16o4i", "NK16n4k")
_X86 = ("x86_64", "amd64", "i386", "i486", "i586", "i686")


class X86Backend(CPUBackend):
    """x86-64 CPUs: the generic CPU build plus hago's VNNI/depthwise kernels and their schedules."""

    intrinsics = frozenset({"x86-vnni", "x86-avx2-vpmaddubsw"})
    generic = False
    layouts = frozenset({None, "NCHW", "NCHW16c"})
    weight_layouts = frozenset({None, "OIHW", *VNNI_WEIGHT_LAYOUTS})
    shipped_intrinsics = frozenset({"dot_16x4_vnni"})

    def claims(self, target) -> bool:
        """An LLVM target for an x86 triple (no triple: this machine's)."""
        triple = str(target.attrs.get("mtriple") or platform.machine())
        return triple.split("-")[0].lower() in _X86

    def plan(self, graph, strategy):
        from .plan import X86Plan

        return X86Plan(graph, strategy)

    def schedule(self, mod, target):
        from .schedules import schedule_vnni

        return schedule_vnni(mod, target)

    def is_kernel(self, func) -> bool:
        from .schedules import is_kernel

        return is_kernel(func)

    def schedule_kernels(self, sch) -> bool:
        from .schedules import schedule_kernels

        return schedule_kernels(sch)

    def register_intrinsics(self, target) -> None:
        from .schedules import register_intrinsics

        register_intrinsics()

    def fix_shipped_intrinsics(self, target) -> None:
        """MetaSchedule's VNNI rule looks up TVM's ``dot_16x4_vnni``, which LLVM 22 rejects: re-register it fixed."""
        from .schedules import has_vnni
        from .vnni_intrin import fix_shipped_vnni_intrin

        if has_vnni(target):
            fix_shipped_vnni_intrin()
