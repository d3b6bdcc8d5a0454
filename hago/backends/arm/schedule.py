"""ARM int8 kernels: int8 matmul and conv2d tensorized with NEON ``smull`` or ``sdot``.

The default Relax CPU pipeline legalizes ``matmul``/``conv2d`` into plain loops,
and LLVM never turns those into ``sdot`` (Cortex-A76, Pi 5) or the NEON
``smull``/``saddlp`` sequence (Cortex-A72, Pi 4). TVM ships both as 4x4 tensor
intrinsics (restated in :mod:`hago.backends.arm.intrin`): one call multiplies four
int8 activations by a 4x4 int8 weight tile and adds four int32 lanes. They need
the weight tile contiguous, i.e. weights packed as ``[N/4, K/4, 4n, 4k]``.

Since hago's realized weights are constants, the packing happens once here, in
numpy, and each eligible ``matmul``/``conv2d`` becomes a ``call_tir`` to a
pre-scheduled TIR kernel:

- dense: ``C[i, n] = sum_k A[i, k] * Wp[n/4, k/4, n%4, k%4]``, N padded to 4;
- conv2d: the same GEMM over an on-the-fly im2col row per output pixel
  (``K = C*R*S`` padded to 4 with zeros), written back in NCHW.

Integer sums are exact, so results are bit-identical to the naive kernels.
Kernels are marked opaque and scheduled, so FuseOps/dlight leave them alone.
Runs after ``realize`` and before ``tvm.compile``; which intrinsic is used
comes from ``spec.intrinsics`` (data in the YAML, not a branch on the name).
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.relax.expr_functor import mutator

from hago.tvm_consts import IS_SCHEDULED, OPAQUE

from ..int8_swap import Int8KernelSwap, swap_kernels
from . import INTRINSICS as SPEC_INTRINSICS
from . import intrin

log = logging.getLogger(__name__)

# spec.intrinsics name -> tensor intrinsic, in order of preference
INTRINSICS = dict(zip(SPEC_INTRINSICS, (intrin.SDOT, intrin.NEON)))
_TILE = 4


def apply_arm_schedules(mod: tvm.IRModule, spec) -> tvm.IRModule:
    """Replace int8 ``matmul``/``conv2d`` with constant weights by tensorized ARM kernels.

    ``spec`` is a :class:`~hago.hwspec.HardwareSpec`; its first intrinsic found
    in :data:`INTRINSICS` picks the kernel (``arm-sdot`` before ``arm-neon-smull``
    if both are listed). A spec with neither, or a module with no eligible op,
    comes back unchanged. Apply to the realized module, before ``tvm.compile``.
    """
    names = [n for n in INTRINSICS if n in (spec.intrinsics or [])]
    if not names:
        return mod
    intrin.register()

    swap = _ArmKernels(mod, INTRINSICS[names[0]])
    out = swap_kernels(mod, swap)
    log.info("%s: %d int8 kernels tensorized with %s", spec.name, swap.count, names[0])
    return out


def pack_weight(w_nk: np.ndarray) -> np.ndarray:
    """``[N, K]`` int8 -> ``[ceil(N/4), ceil(K/4), 4, 4]``, zero padded (zeros add nothing)."""
    n, k = w_nk.shape
    npad, kpad = -n % _TILE, -k % _TILE
    w = np.pad(w_nk, ((0, npad), (0, kpad)))
    return np.ascontiguousarray(
        w.reshape((n + npad) // _TILE, _TILE, (k + kpad) // _TILE, _TILE).transpose(0, 2, 1, 3))


def _ceil4(x: int) -> int:
    return -(-x // _TILE) * _TILE


def _tile_gemm(sch: s_tir.Schedule, block, outer: int):
    """Split the (n, k) loops after ``outer`` spatial loops by 4: ``... no, ko, ni, ki``; returns ``ko``."""
    loops = sch.get_loops(block)
    no, ni = sch.split(loops[outer], [None, _TILE])
    ko, ki = sch.split(loops[outer + 1], [None, _TILE])
    sch.reorder(no, ko, ni, ki)
    return ko


def _tensorize_gemm(sch: s_tir.Schedule, block, ko, intrin: str) -> None:
    """Parallelise the outermost loop, zero-init outside ``ko``, tensorize the 4x4 tile.

    Last step: once decomposed the block is no longer a reduction, so every
    compute_at and the parallel loop must already be in place.
    """
    sch.parallel(sch.get_loops(block)[0])
    init = sch.decompose_reduction(block, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(sch.get_loops(block)[-2], intrin)


def dense_kernel(k: int, n: int, intrin: str) -> tirx.PrimFunc:
    """``A[m, K] int8 x Wp[N/4, K/4, 4, 4] int8 -> C[m, N] int32`` for any batch ``m``; K % 4 == 0."""
    m = tirx.Var("m", "int64")
    npad = _ceil4(n)
    a = te.placeholder((m, k), "int8", name="A")
    w = te.placeholder((npad // _TILE, k // _TILE, _TILE, _TILE), "int8", name="W")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (m, npad),
        lambda i, j: te.sum(a[i, r].astype("int32") * w[j // 4, r // 4, j % 4, r % 4].astype("int32"), axis=r),
        name="acc")
    # N % 4 != 0: the padded [m, N+pad] product, then a copy (compute_at would cut the tile)
    out = acc if npad == n else te.compute((m, n), lambda i, j: acc[i, j], name="C")
    sch = s_tir.Schedule(te.create_prim_func([a, w, out]))
    blk = sch.get_sblock("acc")
    ko = _tile_gemm(sch, blk, outer=1)
    _tensorize_gemm(sch, blk, ko, intrin)
    return _finish(sch)


def conv2d_kernel(shape: tuple, wshape: tuple, strides, padding, dilation, intrin: str) -> tirx.PrimFunc:
    """NCHW int8 conv as im2col GEMM: ``data[n, C, H, W]``, ``Wp[O/4, K/4, 4, 4]``, K = C*R*S.

    ``shape`` is ``(C, H, W)`` of the data; the batch stays symbolic.
    """
    c, h, wd = shape
    o, _, kr, ks = wshape
    (sh, sw), (dh, dw) = strides, dilation
    pt, pl, pb, pr = padding
    oh = (h + pt + pb - (kr - 1) * dh - 1) // sh + 1
    ow = (wd + pl + pr - (ks - 1) * dw - 1) // sw + 1
    kk, kpad, opad = c * kr * ks, _ceil4(c * kr * ks), _ceil4(o)
    nb = tirx.Var("n", "int64")  # any batch: one kernel serves every call site of this layer shape
    data = te.placeholder((nb, c, h, wd), "int8", name="data")
    w = te.placeholder((opad // _TILE, kpad // _TILE, _TILE, _TILE), "int8", name="W")

    def im2col(b, y, x, q):
        ci, rr, ss = q // (kr * ks), q % (kr * ks) // ks, q % ks
        iy, ix = y * sh + rr * dh - pt, x * sw + ss * dw - pl
        inside = tirx.all(q < kk, iy >= 0, iy < h, ix >= 0, ix < wd)
        return tirx.if_then_else(inside, data[b, ci, iy, ix], tirx.const(0, "int8"))

    col = te.compute((nb, oh, ow, kpad), im2col, name="col")
    r = te.reduce_axis((0, kpad), name="k")
    acc = te.compute(
        (nb, oh, ow, opad),
        lambda b, y, x, j: te.sum(col[b, y, x, r].astype("int32") * w[j // 4, r // 4, j % 4, r % 4].astype("int32"),
                                  axis=r),
        name="acc")
    out = te.compute((nb, o, oh, ow), lambda b, j, y, x: acc[b, y, x, j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([data, w, out]))
    blk = sch.get_sblock("acc")
    ko = _tile_gemm(sch, blk, outer=3)
    # one im2col row per output pixel, reused across all output channels
    sch.compute_at(sch.get_sblock("col"), sch.get_loops(blk)[2])
    sch.reverse_compute_at(sch.get_sblock("out"), sch.get_loops(blk)[0])
    _tensorize_gemm(sch, blk, ko, intrin)
    return _finish(sch)


def _finish(sch: s_tir.Schedule) -> tirx.PrimFunc:
    func = sch.mod["main"]
    return func.with_attrs({"op_pattern": OPAQUE, IS_SCHEDULED: True, "tir.noalias": True})


@mutator
class _ArmKernels(Int8KernelSwap):
    """The shared int8 swap (:mod:`hago.backends.int8_swap`) with the 4x4 NEON/SDOT GEMM kernels."""

    prefix = "hago_arm_"

    def __init__(self, mod: tvm.IRModule, intrin: str):
        super().__init__(mod)
        self.intrin = intrin

    def dense(self, call: relax.Call, x: tuple, w: np.ndarray) -> relax.Expr | None:
        if x[1] % _TILE:
            return None
        k, n = w.shape
        gv = self.kernel(("dense", k, n), lambda name: dense_kernel(k, n, self.intrin).with_attr("global_symbol", name))
        return relax.call_tir(gv, [call.args[0], relax.const(pack_weight(w.T))], call.ty)

    def conv2d(self, call: relax.Call, x: tuple, w: np.ndarray, strides: list, padding: list,
               dilation: list) -> relax.Expr | None:
        key = ("conv2d", *x[1:], *w.shape, *strides, *padding, *dilation)
        gv = self.kernel(key, lambda name: conv2d_kernel(x[1:], w.shape, strides, padding, dilation,
                                                         self.intrin).with_attr("global_symbol", name))
        wp = pack_weight(w.reshape(w.shape[0], -1))
        return relax.call_tir(gv, [call.args[0], relax.const(wp)], call.ty)
