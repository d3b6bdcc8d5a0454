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
registered on first use and costing a few milliseconds (and
``HAGO_VNNI_INT4_INTRIN``, its packed 4-bit twin: one load, two ``vpdpbusd``,
see :mod:`.vnni_int4`). MetaSchedule looks up
the shipped name; ``fix_shipped_vnni_intrin`` imports the shipped module once
and overrides that name with the same fixed implementation (the slow import is
then paid only by tuning runs).
"""

from __future__ import annotations

import threading

HAGO_VNNI_INTRIN = "hago_dot_16x4_vnni"
#: 16 lanes x 8 packed 4-bit weights (:mod:`.int4`): two ``vpdpbusd`` from one 64-byte load
HAGO_VNNI_INT4_INTRIN = "hago_dot_16x8_vnni_int4"
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


def weight16(byte, half):
    """16 x the signed nibble ``half`` (0: low, 1: high) of packed uint8 ``byte``, as int32 (TIR expression).

    ``(byte << (4 - 4 * half)) & 0xF0`` in uint8, read as int8: the nibble in
    the high bits of a byte is its value times 16, no sign extension needed.
    The int4 kernel's TE and the intrinsic's description both use this
    expression, so ``tensorize`` matches them structurally.
    """
    from tvm import tirx

    shift = tirx.const(4, "uint8") - half.astype("uint8") * tirx.const(4, "uint8")
    return tirx.bitwise_and(tirx.shift_left(byte, shift), tirx.const(0xF0, "uint8")).astype("int8").astype("int32")


def _int4_intrin_funcs():
    from tvm.script import tirx as T

    # C[i] += 16 * sum_{h, b} A[4h + b] * nibble_h(B[i, b]) over 16 lanes: one load of B, two vpdpbusd
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((8,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "uint8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:8], B[0:16, 0:4])
            T.writes(C[0:16])
            for i, h, b in T.grid(16, 2, 4):
                with T.sblock("update"):
                    vi, vh, vb = T.axis.remap("SRR", [i, h, b])
                    C[vi] = C[vi] + T.cast(A[vh * 4 + vb], "int32") * weight16(B[vi, vb], vh)

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((8,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "uint8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:8], B[0:16, 0:4])
            T.writes(C[0:16])
            a_lo = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                                 dtype="uint8x64")
            a_hi = T.reinterpret(T.broadcast(T.reinterpret(A.vload([4], "uint8x4"), dtype="int32"), 16),
                                 dtype="uint8x64")
            b = B.vload([0, 0], dtype="uint8x64")
            # LLVM lowers the byte shift to vpsllw + vpand 0xF0: 3 ALU ops for 128 weights
            lo16 = T.reinterpret(T.shift_left(b, T.broadcast(T.uint8(4), 64)), dtype="int8x64")
            hi16 = T.reinterpret(T.bitwise_and(b, T.broadcast(T.uint8(0xF0), 64)), dtype="int8x64")
            c = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                                        C.vload([0], dtype="int32x16"), a_lo, lo16, dtype="int32x16")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), c, a_hi, hi16, dtype="int32x16")

    return desc, impl


def vnni_int4_intrin() -> str:
    """Register (once) and return the name of the packed 4-bit intrinsic (16 lanes x 8 nibbles, two ``vpdpbusd``)."""
    return _register_once(HAGO_VNNI_INT4_INTRIN, _int4_intrin_funcs)


def vnni_intrin() -> str:
    """Register (once) and return the name of hago's fixed 16x4 VNNI intrinsic."""
    return _register_once(HAGO_VNNI_INTRIN, _intrin_funcs)


def _register_once(name: str, funcs) -> str:
    """Register the tensor intrinsic ``funcs() -> (desc, impl)`` under ``name`` the first time it is asked for."""
    with _lock:
        if name not in _registered:
            from tvm.s_tir import TensorIntrin

            desc, impl = funcs()
            TensorIntrin.register(name, desc, impl, override=True)
            _registered.add(name)
    return name


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
