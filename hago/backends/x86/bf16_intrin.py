"""The ``vdpbf16ps`` tensor intrinsic: 16 fp32 lanes += 16 x 2 bfloat16 products.

``vdpbf16ps`` is ``vpdpbusd`` with two bf16 per 32-bit lane instead of four
bytes: ``C[i] += a[0]*B[i, 0] + a[1]*B[i, 1]`` for 16 lanes, the products
exact in fp32 and each sum rounded to nearest even. Like ``vnni_intrin`` the
intrinsic is hago's own and registered lazily.

TVM 0.27 cannot hand bf16 vectors to LLVM: its ``BF16ComputeLegalize`` pass
promotes every bf16 operand of a call (``call_llvm_pure_intrin`` included)
to fp32, and ``BF16StorageLegalize`` turns the rest into ``uint16``, while
LLVM 22's ``llvm.x86.avx512bf16.dpbf16ps.512`` takes ``<32 x bfloat>``
operands (earlier LLVMs took ``<16 x i32>``), so a direct call fails LLVM's
verifier. The implementation therefore calls ``SHIM``, a five-line LLVM IR
function with ``<16 x i32>`` operands that bitcasts them to ``<32 x bfloat>``
and calls the intrinsic. The schedules link it into each kernel with the loop
pragma ``pragma_import_llvm`` (``link_shim``); TVM marks imported functions
``alwaysinline`` + ``available_externally``, so no call and no copy of the
function remain, only the instruction. The TIR operands stay 32-bit integers
(bf16 pairs reinterpreted), which no legalization touches.

The description computes in fp32 from bf16 buffers exactly like the
kernels' TE (``cast(a) * cast(b)`` summed), so a naive, untensorized kernel
computes the same sums (TVM legalizes its bf16 loads to fp32) on any CPU.
"""

from __future__ import annotations

import threading

HAGO_BF16_INTRIN = "hago_dot_16x2_bf16"
SHIM_SYMBOL = "hago_dpbf16ps"
IMPORT_PRAGMA = "pragma_import_llvm"  # CodeGenLLVM links the annotated LLVM IR text into the module
SHIM = f"""
define <16 x float> @{SHIM_SYMBOL}(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) {{
  %a16 = bitcast <16 x i32> %a to <32 x bfloat>
  %b16 = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %a16, <32 x bfloat> %b16)
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""

_lock = threading.Lock()
_registered: set[str] = set()


def _intrin_funcs(a_dtype: str = "bfloat16"):
    """``(desc, impl)``; ``a_dtype`` ``"uint16"``: the broadcast operand is bf16 *bits* in a ``uint16`` buffer
    (a buffer the kernel allocates itself: TVM's ``BF16ComputeLegalize`` turns an internal bf16 buffer into
    fp32, which would leave the pair's bits no 32-bit lane to reinterpret)."""
    from tvm.script import tirx as T

    bits = a_dtype == "uint16"

    def a_value(v):
        return T.cast(T.reinterpret("bfloat16", v) if bits else v, "float32")

    # C[i] += A[k] * B[i, k] over 16 fp32 lanes x 2 bf16: one vdpbf16ps.
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((2,), a_dtype, offset_factor=1),
        B: T.Buffer((16, 2), "bfloat16", offset_factor=1),
        C: T.Buffer((16,), "float32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + a_value(A[vk]) * T.cast(B[vi, vk], "float32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2,), a_dtype, offset_factor=1),
        B: T.Buffer((16, 2), "bfloat16", offset_factor=1),
        C: T.Buffer((16,), "float32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_extern(
                "float32x16",
                SHIM_SYMBOL,
                C.vload([0], dtype="float32x16"),
                T.broadcast(T.reinterpret(A.vload([0], a_dtype + "x2"), dtype="int32"), 16),
                T.reinterpret(B.vload([0, 0], dtype="bfloat16x32"), dtype="int32x16"),
            )

    return desc, impl


def bf16_intrin(a_dtype: str = "bfloat16") -> str:
    """Register (once) and return the name of hago's 16x2 ``vdpbf16ps`` intrinsic for a broadcast operand stored
    as ``a_dtype`` (``"uint16"``: bf16 bits, see :func:`_intrin_funcs`)."""
    name = HAGO_BF16_INTRIN if a_dtype == "bfloat16" else f"{HAGO_BF16_INTRIN}_{a_dtype}"
    with _lock:
        if name not in _registered:
            from tvm.s_tir import TensorIntrin

            desc, impl = _intrin_funcs(a_dtype)
            TensorIntrin.register(name, desc, impl, override=True)
            _registered.add(name)
    return name


def link_shim(sch, loop) -> None:
    """Link ``SHIM`` into the function that holds ``loop`` (once per PrimFunc that tensorizes with the intrinsic).

    Without it the build succeeds but the library has an undefined ``hago_dpbf16ps``.
    """
    sch.annotate(loop, IMPORT_PRAGMA, SHIM)
