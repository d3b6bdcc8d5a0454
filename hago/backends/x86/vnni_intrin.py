"""The ``vpdpbusd`` tensor intrinsic, registered lazily and LLVM-22 clean.

TVM 0.27 ships ``dot_16x4_vnni`` in ``tvm.s_tir.tensor_intrin.x86``, with two
problems for hago:

* its implementation hands ``llvm.x86.avx512.vpdpbusd.512`` ``<16 x i32>``
  operands, which LLVM 22's verifier rejects (the intrinsic now takes
  ``<64 x i8>``), so every tensorized kernel fails to build;
* importing ``tvm.s_tir.tensor_intrin`` also parses every CUDA/ROCm/Hexagon
  intrinsic: about 30 s on this machine, paid by every process that builds.

The default schedules therefore use their own copy, ``HAGO_VNNI_INTRIN``: the
same 16-lane x 4-byte description with ``uint8x64``/``int8x64`` operands,
registered on first use and costing a few milliseconds. MetaSchedule looks up
the shipped name; ``fix_shipped_vnni_intrin`` imports the shipped module once
and overrides that name with the same fixed implementation (the slow import is
then paid only by tuning runs).
"""

from __future__ import annotations

import threading

HAGO_VNNI_INTRIN = "hago_dot_16x4_vnni"
SHIPPED_VNNI_INTRIN = "dot_16x4_vnni"

_lock = threading.Lock()
_registered: set[str] = set()


def _intrin_funcs():
    from tvm.script import tirx as T

    # C[i] += A[k] * B[i, k] over 16 output lanes x 4 reduction bytes: one vpdpbusd.
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
            b_i8x64 = B.vload([0, 0], dtype="int8x64")
            c_i32x16 = C.vload([0], dtype="int32x16")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                c_i32x16,
                a_u8x64,
                b_i8x64,
                dtype="int32x16",
            )

    return desc, impl


def vnni_intrin() -> str:
    """Register (once) and return the name of hago's fixed 16x4 VNNI intrinsic."""
    with _lock:
        if HAGO_VNNI_INTRIN not in _registered:
            from tvm.s_tir import TensorIntrin

            desc, impl = _intrin_funcs()
            TensorIntrin.register(HAGO_VNNI_INTRIN, desc, impl, override=True)
            _registered.add(HAGO_VNNI_INTRIN)
    return HAGO_VNNI_INTRIN


def fix_shipped_vnni_intrin() -> str:
    """Override TVM's ``dot_16x4_vnni`` with the LLVM-22 clean implementation.

    For MetaSchedule runs, whose VNNI rules look that name up. Imports
    ``tvm.s_tir.tensor_intrin`` first (slow, ~30 s) so that its own
    registration cannot later collide with ours.
    """
    with _lock:
        if SHIPPED_VNNI_INTRIN not in _registered:
            import tvm.s_tir.tensor_intrin  # noqa: F401  registers the originals
            from tvm.s_tir import TensorIntrin

            desc, impl = _intrin_funcs()
            TensorIntrin.register(SHIPPED_VNNI_INTRIN, desc, impl, override=True)
            _registered.add(SHIPPED_VNNI_INTRIN)
    return SHIPPED_VNNI_INTRIN
