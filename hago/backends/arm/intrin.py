"""The two ARM int8 4x4 dot-product tensor intrinsics, registered under hago's names.

They are TVM's ``dot_4x4_i8i8s32_sdot`` and ``dot_4x4_i8i8s32_neon`` from
``tvm/s_tir/tensor_intrin/arm_cpu.py`` (Apache-2.0), restated here because
importing that module runs ``tvm.s_tir.tensor_intrin/__init__`` which parses
every CUDA/ROCm/Hexagon intrinsic first: ~35 s per process, against well
under a second for these two.

Both compute ``C[i] += sum_k A[k] * B[i, k]`` for i, k < 4: four int8
activations against a contiguous 4x4 int8 weight tile into four int32 lanes.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

SDOT = "hago_arm_sdot_4x4_i8i8s32"  # Cortex-A76 and later (+dotprod): one sdot per tile
NEON = "hago_arm_neon_4x4_i8i8s32"  # any AArch64 NEON: smull x2, saddlp x2, addp


@T.prim_func(s_tir=True)
def _desc(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for i in T.serial(0, 4):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _sdot_impl(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        # the four activations, as one int32 broadcast to all four lanes
        vec_a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"), vec_a, B.vload([0, 0], dtype="int8x16"),
            dtype="int32x4",
        )


@T.prim_func(s_tir=True)
def _neon_impl(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        vec_a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 2), dtype="int8x8")
        vec_b = B.vload([0, 0], dtype="int8x16")
        # s8 x s8 -> s16 (exact), pairwise s16 + s16 -> s32 (exact), then pairs -> lanes
        low = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
            T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                                    vec_a, T.vectorlow(vec_b, dtype="int8x8"), dtype="int16x8"),
            dtype="int32x4",
        )
        high = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
            T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                                    vec_a, T.vectorhigh(vec_b, dtype="int8x8"), dtype="int16x8"),
            dtype="int32x4",
        )
        C[T.ramp(T.int32(0), 1, 4)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"), low, high, dtype="int32x4")


def register() -> None:
    """Register both intrinsics once per process (idempotent)."""
    for name, impl in ((SDOT, _sdot_impl), (NEON, _neon_impl)):
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, _desc, impl)
