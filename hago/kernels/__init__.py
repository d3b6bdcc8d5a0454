"""Hand-scheduled integer kernels for layouts a target's fast instructions need.

``realize`` calls an ``emit_*`` function where the hardware spec names such a
layout (today: x86 VNNI, ``weight_layout: NK16n4k`` / ``OIHW4i16o4i``, and the
NCHW depthwise kernel on the same specs); the emitted PrimFuncs carry a
``hago.kernel`` block annotation, and ``schedule_vnni`` gives them their
default schedules (``registry.SCHEDULES``) before ``tvm.compile`` so an
untuned build already runs ``vpdpbusd`` / vectorized depthwise code.
"""

#: weight layouts (spec descriptor ``weight_layout``) served by the VNNI kernels
VNNI_WEIGHT_LAYOUTS = ("OIHW4i16o4i", "NK16n4k")

from .registry import (
    SCHEDULES,
    ScheduleVNNI,
    has_vnni,
    is_kernel,
    kernel_blocks,
    register_intrinsics,
    schedule_kernels,
    schedule_vnni,
)
from .vnni_intrin import HAGO_VNNI_INTRIN, fix_shipped_vnni_intrin, vnni_intrin
from .epilogue import Requant
from .x86_depthwise import depthwise_applicable, emit_conv2d_depthwise
from .x86_depthwise_blocked import emit_conv2d_depthwise_blocked
from .x86_vnni import (
    KERNEL_ATTR,
    emit_conv2d_vnni,
    emit_dense_vnni,
    emit_from_blocked,
    emit_to_blocked,
    pack_conv_weight,
    pack_dense_weight,
    vnni_applicable,
)

__all__ = [
    "VNNI_WEIGHT_LAYOUTS",
    "HAGO_VNNI_INTRIN",
    "KERNEL_ATTR",
    "Requant",
    "SCHEDULES",
    "ScheduleVNNI",
    "depthwise_applicable",
    "emit_conv2d_depthwise",
    "emit_conv2d_depthwise_blocked",
    "emit_conv2d_vnni",
    "emit_dense_vnni",
    "emit_from_blocked",
    "emit_to_blocked",
    "fix_shipped_vnni_intrin",
    "has_vnni",
    "is_kernel",
    "kernel_blocks",
    "pack_conv_weight",
    "pack_dense_weight",
    "register_intrinsics",
    "schedule_kernels",
    "schedule_vnni",
    "vnni_applicable",
    "vnni_intrin",
]
