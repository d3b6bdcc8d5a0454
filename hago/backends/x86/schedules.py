"""The registry of the x86 backend's hand-scheduled kernels and their default schedules.

Every kernel block an ``emit_*`` function creates carries the annotation
``hago.kernel`` naming its kind; ``SCHEDULES`` maps the kind to its default
(untuned) schedule. Used by ``schedule_vnni`` (untuned builds) and by
``hago.tune`` through the x86 backend (which kernels are tasks of their own, and the hand-written
schedule each one's tuning starts from).
"""

from __future__ import annotations

import logging
from typing import Callable

import tvm
from tvm.s_tir import Schedule, ScheduleError

from hago.errors import error_line
from hago.tvm_consts import IS_SCHEDULED, OPAQUE

from ..cpu.float_schedule import kernel_blocks as annotated_blocks

from .bf16 import CONV_BF16, DENSE_BF16, FROM_NCHWC_F32, PAD_NCHWC_BF16, TO_BF16, TO_NCHWC_BF16
from .bf16_intrin import bf16_intrin
from .bf16_schedule import (schedule_conv_bf16, schedule_dense_bf16, schedule_from_nchwc_f32,
                            schedule_pad_nchwc_bf16, schedule_to_bf16, schedule_to_nchwc_bf16)
from .depthwise import DEPTHWISE, deinterleave_intrin, schedule_depthwise
from .depthwise_blocked import DEPTHWISE_NCHWC, schedule_depthwise_blocked
from .vnni_intrin import vnni_int4_intrin, vnni_intrin
from .vnni import CONV, DENSE, FROM_NCHWC, PAD_NCHWC, TO_NCHWC
from .vnni_conv_int4 import CONV_INT4
from .vnni_int4 import DENSE_INT4
from .vnni_schedule import (schedule_conv, schedule_conv_int4, schedule_dense, schedule_dense_int4,
                            schedule_from_nchwc, schedule_pad_nchwc, schedule_to_nchwc)

log = logging.getLogger(__name__)

#: kernel kind (the ``hago.kernel`` block annotation) -> default schedule ``f(sch, block)``
SCHEDULES: dict[str, Callable] = {
    DENSE: schedule_dense,
    DENSE_INT4: schedule_dense_int4,
    CONV: schedule_conv,
    CONV_INT4: schedule_conv_int4,
    TO_NCHWC: schedule_to_nchwc,
    FROM_NCHWC: schedule_from_nchwc,
    PAD_NCHWC: schedule_pad_nchwc,
    DEPTHWISE: schedule_depthwise,
    DEPTHWISE_NCHWC: schedule_depthwise_blocked,
    DENSE_BF16: schedule_dense_bf16,
    CONV_BF16: schedule_conv_bf16,
    TO_BF16: schedule_to_bf16,
    TO_NCHWC_BF16: schedule_to_nchwc_bf16,
    PAD_NCHWC_BF16: schedule_pad_nchwc_bf16,
    FROM_NCHWC_F32: schedule_from_nchwc_f32,
}
#: kinds whose schedules need ``avx512vnni`` (``vpdpbusd``); the others are plain vector code for any LLVM CPU
NEEDS_VNNI = frozenset({DENSE, DENSE_INT4, CONV, CONV_INT4, TO_NCHWC, FROM_NCHWC, PAD_NCHWC})
#: kinds whose schedules need ``avx512bf16`` (``vdpbf16ps``); their layout conversions run anywhere
NEEDS_BF16 = frozenset({DENSE_BF16, CONV_BF16})


def register_intrinsics() -> None:
    """Register the tensor intrinsics the default schedules tensorize with (cheap, idempotent)."""
    vnni_intrin()
    vnni_int4_intrin()
    bf16_intrin()
    bf16_intrin("uint16")  # a conv that pads its own bf16 input (bf16.PAD_INSIDE): replayed traces name it too
    deinterleave_intrin()


def kernel_blocks(sch: Schedule) -> list[tuple[str, object]]:
    """``(kind, block)`` of every registered kernel block directly under ``sch``'s root."""
    return annotated_blocks(sch, SCHEDULES)


def is_kernel(func: tvm.tirx.PrimFunc) -> bool:
    """Whether ``func`` holds a registered kernel block."""
    try:
        return bool(kernel_blocks(Schedule(tvm.IRModule({"main": func}))))
    except Exception:  # not a schedulable PrimFunc (already lowered, no root block)
        return False


def schedule_kernels(sch: Schedule) -> bool:
    """Apply the default schedule of every kernel block in ``sch``; False when it holds none.

    Raises ``ScheduleError`` / ``InternalError`` when a schedule does not apply.
    """
    blocks = kernel_blocks(sch)
    for kind, blk in blocks:
        SCHEDULES[kind](sch, blk)
    return bool(blocks)


def schedule_kernels_for(sch: Schedule, target: tvm.target.Target) -> bool:
    """``schedule_kernels`` where ``target`` runs the kernels' instructions; False (``sch`` untouched) where it
    holds no kernel or one the target cannot run (it stays naive, as in :func:`schedule_func`)."""
    kinds = {kind for kind, _ in kernel_blocks(sch)}
    if (not kinds or target.kind.name != "llvm" or (kinds & NEEDS_VNNI and not has_vnni(target))
            or (kinds & NEEDS_BF16 and not has_bf16(target))):
        return False
    return schedule_kernels(sch)


def schedule_func(func: tvm.tirx.PrimFunc, vnni: bool = True, bf16: bool = True) -> tvm.tirx.PrimFunc | None:
    """The scheduled ``func``, or None when it holds no hago kernel block, or one the target cannot run.

    ``vnni`` / ``bf16``: whether the target has ``avx512vnni`` / ``avx512bf16``;
    a function with a kernel that needs the missing feature stays naive.
    """
    sch = Schedule(tvm.IRModule({"main": func}))
    kinds = {kind for kind, _ in kernel_blocks(sch)}
    if not kinds or (not vnni and kinds & NEEDS_VNNI) or (not bf16 and kinds & NEEDS_BF16):
        return None
    try:
        schedule_kernels(sch)
    except (ScheduleError, tvm.error.InternalError) as e:  # unscheduled is slow but still correct
        log.warning("default kernel schedule failed, the kernel stays naive: %s", error_line(e, limit=None))
        return None
    # opaque to FuseOps (FuseTIR would merge an epilogue into a scheduled body); dlight skips it
    return sch.mod["main"].with_attr(IS_SCHEDULED, True).with_attr("op_pattern", OPAQUE)


def has_vnni(target: tvm.target.Target) -> bool:
    """Whether ``target`` can run the 512-bit ``vpdpbusd`` these schedules emit."""
    from tvm.target.codegen import target_has_features

    return target.kind.name == "llvm" and bool(target_has_features("avx512vnni", target))


def has_bf16(target: tvm.target.Target) -> bool:
    """Whether ``target`` can run the 512-bit ``vdpbf16ps`` the bf16 schedules emit.

    Cooper Lake, Sapphire Rapids and later, Zen 4/5; not Cascade Lake or skylake-avx512.
    """
    from tvm.target.codegen import target_has_features

    return target.kind.name == "llvm" and bool(target_has_features("avx512bf16", target))


def schedule_vnni(mod: tvm.IRModule, target: tvm.target.Target | None = None) -> tvm.IRModule:
    """Apply the default schedules to every hago kernel PrimFunc in ``mod``.

    Runs after ``realize`` (the kernels are PrimFuncs from the moment
    ``emit_*`` emits them) and before ``tvm.compile``; every other function,
    and every function already scheduled (``tirx.is_scheduled``, e.g. by a
    MetaSchedule database), is left alone.

    Parameters
    ----------
    mod
        A Relax module, before or after ``LegalizeOps``; best before
        ``FuseOps`` so the kernels are still functions of their own.
    target
        The build target (default: ``Target.current()``). Without
        ``avx512vnni`` (skylake, AVX2-only CPUs) only the kernels in plain
        vector code (depthwise) are scheduled, without ``avx512bf16``
        (Cascade Lake) no bf16 kernel is, on a non-LLVM target none: the
        naive kernels are slow but correct everywhere.
    """
    target = target or tvm.target.Target.current(allow_none=True)
    if target is not None and target.kind.name != "llvm":
        return mod
    vnni = target is None or has_vnni(target)
    bf16 = target is None or has_bf16(target)
    if not vnni:
        log.info("target %s has no avx512vnni: VNNI kernels stay unscheduled", target)
    if not bf16:
        log.info("target %s has no avx512bf16: bf16 kernels stay unscheduled", target)
    from hago.lower import schedule_unscheduled

    return schedule_unscheduled(mod, lambda func: schedule_func(func, vnni, bf16))


def ScheduleVNNI() -> tvm.transform.Pass:  # noqa: N802  (TVM pass naming)
    """``schedule_vnni`` as a module pass, for a ``tvm.transform.Sequential``."""

    @tvm.transform.module_pass(opt_level=0, name="hago.ScheduleVNNI")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return schedule_vnni(mod)

    return _pass
