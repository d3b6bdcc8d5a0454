"""The x86 backend's hand-scheduled integer kernels, in one import.

The x86 plan (:mod:`.plan`) calls an ``emit_*`` function where the hardware
spec names such a layout (VNNI, ``weight_layout: NK16n4k`` /
``OIHW4i16o4i``, a 4-bit dense or conv with packed weights, and the NCHW depthwise
kernel on the same specs); the
emitted PrimFuncs carry a ``hago.kernel`` block annotation, and
``schedule_vnni`` gives them their default schedules (``schedules.SCHEDULES``)
before ``tvm.compile`` so an untuned build already runs ``vpdpbusd`` /
vectorized depthwise code.
"""

from ..base import Requant
from . import VNNI_WEIGHT_LAYOUTS
from .schedules import (
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
from .vnni_int4 import emit_dense_vnni_int4, int4_applicable
from .vnni_conv_int4 import conv_int4_applicable, emit_conv2d_vnni_int4
from .depthwise import depthwise_applicable, emit_conv2d_depthwise
from .depthwise_blocked import emit_conv2d_depthwise_blocked
from .vnni import (
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
    "emit_conv2d_vnni_int4",
    "conv_int4_applicable",
    "emit_dense_vnni",
    "emit_dense_vnni_int4",
    "emit_from_blocked",
    "emit_to_blocked",
    "fix_shipped_vnni_intrin",
    "has_vnni",
    "int4_applicable",
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
