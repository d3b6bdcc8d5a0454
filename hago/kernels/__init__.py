"""Hand-scheduled integer kernels for layouts a target's fast instructions need.

``realize`` calls an ``emit_*`` function where the hardware spec names such a
layout (today: x86 VNNI, ``weight_layout: NK16n4k`` / ``OIHW4i16o4i``); the
emitted PrimFuncs carry a ``hago.kernel`` block annotation, and
``schedule_vnni`` gives them default schedules before ``tvm.compile`` so an
untuned build already runs ``vpdpbusd``.
"""

#: weight layouts (spec descriptor ``weight_layout``) served by the VNNI kernels
VNNI_WEIGHT_LAYOUTS = ("OIHW4i16o4i", "NK16n4k")

from .vnni_intrin import HAGO_VNNI_INTRIN, fix_shipped_vnni_intrin, vnni_intrin
from .x86_vnni import (
    KERNEL_ATTR,
    emit_conv2d_vnni,
    emit_dense_vnni,
    pack_conv_weight,
    pack_dense_weight,
    vnni_applicable,
)
from .x86_vnni_schedule import ScheduleVNNI, has_vnni, schedule_vnni

__all__ = [
    "VNNI_WEIGHT_LAYOUTS",
    "HAGO_VNNI_INTRIN",
    "KERNEL_ATTR",
    "ScheduleVNNI",
    "emit_conv2d_vnni",
    "emit_dense_vnni",
    "fix_shipped_vnni_intrin",
    "has_vnni",
    "pack_conv_weight",
    "pack_dense_weight",
    "schedule_vnni",
    "vnni_applicable",
    "vnni_intrin",
]
