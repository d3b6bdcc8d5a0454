"""One kernel for a dense layer's run-time per-row quantization (:mod:`hago.dynamic`) on a CPU.

Written as plain Relax ops, the per-row quantize of ``x [R, K]`` becomes
seven kernels after fusion: a row min and a row max (each a full pass over
``x``), four tiny ones on the ``[R, 1]`` parameters, and the quantize pass.
On MiniLM (24 such quantizations per sentence) they took 0.68 of 3.9 ms,
mostly thread-pool launches and passes over tensors that had left L1.

Here each parallel task takes whole rows and, per row: one vector pass
keeps ``lanes`` running minima and maxima, folds them, computes the row's
scale, zero point and reciprocal, and a second pass (over a row still in
L1) writes the uint8 codes. The arithmetic is
:func:`hago.dynamic.emit_row_quantize`'s, operation for operation in
float32 (round half to even),
so the result is bit-identical to the Relax-op version and to the
simulated twin.
"""

from __future__ import annotations

import functools

from tvm import relax
from tvm.relax import op as O
from tvm.script import tirx as T

from hago import tvmscript  # noqa: F401  (T.macro calls without reading source files)
from hago.tvm_consts import IS_SCHEDULED, OPAQUE

from .tir_kernel import as_call_tir_kernel

QMAX = 255.0
CHAINS = 4  # independent min/max accumulators per lane (vminps latency 4, two ports)


@functools.lru_cache(maxsize=256)  # one TVMScript parse per shape (PrimFuncs are immutable): ~0.2 s each
def row_quantize_func(rows: int, k: int, lanes: int):
    """``(x [rows, k] f32) -> q [rows, k] u8, scale [rows, 1] f32, zp [rows, 1] i32``.

    ``lanes``: float32 lanes of one vector register (AVX-512: 16); the row
    passes run in vectors of that width when it divides ``k``, else in
    scalars. The range pass keeps up to ``CHAINS`` independent minima and
    maxima per lane, so consecutive vectors do not wait on one another's
    min/max latency.
    """
    vec = lanes if lanes > 1 and k % lanes == 0 and k >= lanes else 1
    steps = k // vec
    acc = next(c for c in (CHAINS, 2, 1) if steps % c == 0)
    width = acc * vec
    attrs = {"tir.noalias": True, IS_SCHEDULED: True, "op_pattern": OPAQUE}
    f32, zero, top = "float32", T.float32(0.0), T.float32(QMAX)

    if vec > 16:
        raise ValueError(f"row quantize: {vec} lanes; the lane fold is written for at most 16")

    @T.macro
    def halve(lo, hi, h):
        for j in T.unroll(h):  # h may be 0 (fewer lanes), which a vectorized loop refuses
            lo[j] = T.min(lo[j], lo[j + h])
            hi[j] = T.max(hi[j], hi[j + h])

    @T.prim_func
    def kernel(x: T.Buffer((rows, k), "float32"), q: T.Buffer((rows, k), "uint8"),
               scale: T.Buffer((rows, 1), "float32"), zp: T.Buffer((rows, 1), "int32")):
        T.func_attr(attrs)
        for r in T.parallel(rows):
            lo = T.decl_buffer((width,), f32, scope="local")
            hi = T.decl_buffer((width,), f32, scope="local")
            s = T.decl_buffer((3,), f32, scope="local")  # the row's scale, float zero point, 1 / scale
            for j in T.vectorized(width):
                lo[j] = x[r, j]
                hi[j] = x[r, j]
            for t in T.serial(1, steps // acc):
                for c in T.unroll(acc):
                    for j in T.vectorized(vec):
                        lo[c * vec + j] = T.min(lo[c * vec + j], x[r, (t * acc + c) * vec + j])
                        hi[c * vec + j] = T.max(hi[c * vec + j], x[r, (t * acc + c) * vec + j])
            for c in T.serial(1, acc):  # the chains into one vector
                for j in T.vectorized(vec):
                    lo[j] = T.min(lo[j], lo[c * vec + j])
                    hi[j] = T.max(hi[j], hi[c * vec + j])
            halve(lo, hi, vec // 2)  # then the lanes, as a tree: depth 4, not a chain of 15
            halve(lo, hi, vec // 4)
            halve(lo, hi, vec // 8)
            halve(lo, hi, vec // 16)
            lo[0] = T.min(lo[0], zero)
            hi[0] = T.max(hi[0], zero)
            s[0] = T.if_then_else(hi[0] - lo[0] > zero, (hi[0] - lo[0]) / top, T.float32(1.0))
            s[1] = T.max(T.min(T.round((zero - lo[0]) / s[0]), top), zero)
            s[2] = T.float32(1.0) / s[0]
            scale[r, 0] = s[0]
            zp[r, 0] = T.Cast("int32", s[1])
            for t in T.serial(steps):
                for j in T.vectorized(vec):
                    q[r, t * vec + j] = T.Cast("uint8", T.max(T.min(
                        T.round(x[r, t * vec + j] * s[2]) + s[1], top), zero))

    return as_call_tir_kernel(kernel)


def emit_row_quantize(bb: relax.BlockBuilder, x: relax.Expr, lanes: int):
    """``(q uint8, scale float32 [..., 1], zp int32 [..., 1])`` of float ``x`` through one kernel call.

    Leading dimensions are flattened into rows (a view: Relax reshapes
    do not copy) and restored on the outputs.
    """
    shape = [int(d) for d in bb.normalize(x).ty.shape]
    k = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    flat = x if len(shape) == 2 else bb.emit(O.reshape(x, (rows, k)))
    gv = bb.add_func(row_quantize_func(rows, k, lanes), "hago_row_quantize")
    out = bb.emit(relax.call_tir(gv, [flat], [relax.TensorType((rows, k), "uint8"),
                                              relax.TensorType((rows, 1), "float32"),
                                              relax.TensorType((rows, 1), "int32")]))
    q, scale, zp = (bb.emit(relax.TupleGetItem(out, i)) for i in range(3))
    if len(shape) != 2:
        lead = shape[:-1]
        q = bb.emit(O.reshape(q, shape))
        scale = bb.emit(O.reshape(scale, (*lead, 1)))
        zp = bb.emit(O.reshape(zp, (*lead, 1)))
    return q, scale, zp
