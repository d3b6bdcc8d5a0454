"""The ``__dp4a`` tensor intrinsic, registered lazily under hago's own name.

TVM 0.27 ships the same intrinsic as ``dp4a_s8s8s32`` in
``tvm.s_tir.tensor_intrin.dot_product_common``, but importing anything under
``tvm.s_tir.tensor_intrin`` first runs the package ``__init__``, which parses
every CUDA/x86/ARM/ROCm/Hexagon intrinsic: tens of seconds per process. This
copy costs milliseconds. The description is TVM's: one int32 accumulator plus
the dot product of four int8 pairs, read from shared memory (``A``, ``B``) into
a register (``C``); the implementation is one ``__dp4a`` (sm_61 and newer).
"""

from __future__ import annotations

import threading

DP4A = "hago_dp4a_s8s8s32"

_lock = threading.Lock()
_done = False


def _funcs():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
        B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for i in range(0, 4):
                with T.sblock("update"):
                    vi = T.axis.remap("R", [i])
                    C[0] = C[0] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
        B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] += T.call_pure_extern("__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"), T.int32(0),
                                       dtype="int32")

    return desc, impl


def register() -> str:
    """Register (once per process) and return the name of the dp4a intrinsic."""
    global _done
    with _lock:
        if not _done:
            from tvm.s_tir import TensorIntrin

            TensorIntrin.register(DP4A, *_funcs(), override=True)
            _done = True
    return DP4A
