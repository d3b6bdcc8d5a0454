"""The ARM backend (Raspberry Pi): int8 NEON/SDOT kernels swapped in after realize.

- :mod:`.schedule`: ``apply_arm_schedules(mod, spec)``, the tensorized int8
  ``matmul``/``conv2d`` kernels (the shared swap of
  :mod:`hago.backends.int8_swap`), applied to the device module before its
  build; the host build for accuracy runs keeps the plain ops;
- :mod:`.intrin`: the two 4x4 dot-product tensor intrinsics.

Realize needs no plan of its own here (plain NCHW int8 ops); the build is the
generic CPU one, exported through the spec's cross compiler. Running aarch64
builds under qemu is :mod:`hago.measure.qemu`. Importing this package imports
no TVM.
"""

from __future__ import annotations

from ..cpu import CPUBackend

#: the spec intrinsics this backend serves, in order of preference (``arm-sdot`` needs ``+dotprod``)
INTRINSICS = ("arm-sdot", "arm-neon-smull")


class ArmBackend(CPUBackend):
    """AArch64 boards: the generic CPU build with NEON/SDOT int8 kernels swapped in."""

    intrinsics = frozenset(INTRINSICS)
    generic = False
    #: ``NK4n4k`` ([N/4, K/4, 4, 4]) is the tile order the swap packs dense weights in
    weight_layouts = frozenset({None, "OIHW", "NK4n4k"})

    #: LLVM features -> the aarch64 /proc/cpuinfo "Features" names (a Pi 4 has asimd, a Pi 5 asimddp too)
    mattr_flags = {"+neon": "asimd", "+dotprod": "asimddp", "+i8mm": "i8mm", "+fullfp16": "fphp"}

    def rewrite(self, mod, spec, target):
        """The int8 ``matmul``/``conv2d`` with constant weights as tensorized kernels (spec's intrinsic)."""
        from .schedule import apply_arm_schedules

        return apply_arm_schedules(mod, spec)
