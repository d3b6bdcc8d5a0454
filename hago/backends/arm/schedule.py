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

**4-bit weights** (every value in [-8, 7]: a layer quantized to 4 bits) are
stored two per byte, ``Wp4[N/4, K/8, 4, 4]`` uint8 (low nibbles: k = 8kb..8kb+3,
high nibbles: k = 8kb+4..8kb+7 of the same 4x4 tile, :func:`pack_weight_int4`),
half the bytes a board reads. Inside the kernel each 16-byte packed tile
becomes two int8 tiles of 16x the weights without sign-extending a nibble
(``p << 4`` and ``p & 0xF0`` as signed bytes, :mod:`hago.backends.nibbles`);
the same ``sdot``/``smull`` intrinsic multiplies them, and one ``>> 4`` of the
int32 sum restores it exactly (``|16 w| <= 128`` fits the signed byte, the sum
is a multiple of 16).

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
from ..nibbles import fits_int4
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


def pack_weight_int4(w_nk: np.ndarray) -> np.ndarray:
    """``[N, K]`` int8 in [-8, 7] -> uint8 ``[ceil(N/4), ceil(K/8), 4, 4]``, two weights per byte, zero padded.

    Byte ``[nb, kb, i, b]``: low nibble ``w[4nb+i, 8kb+b]``, high nibble ``w[4nb+i, 8kb+4+b]``.
    """
    tiles = pack_weight(np.pad(w_nk, ((0, 0), (0, -w_nk.shape[1] % (2 * _TILE)))))  # [N/4, K/4, 4, 4]
    nib = tiles.astype(np.int8).view(np.uint8) & 0x0F
    return np.ascontiguousarray(nib[:, 0::2] | (nib[:, 1::2] << 4))


def _ceil4(x: int) -> int:
    return -(-x // _TILE) * _TILE


def _ceil8(x: int) -> int:
    return -(-x // (2 * _TILE)) * 2 * _TILE


def _unpacked(wp: te.Tensor, ntiles: int, ktiles: int) -> te.Tensor:
    """The int8 ``[N/4, K/4, 4, 4]`` tiles of 16x the packed weights (even k tiles: low nibbles, odd: high)."""
    def tile(nb, kb, i, b):
        p = wp[nb, kb // 2, i, b]
        shift = (tirx.const(1, "int64") - kb % 2) * 4  # 4 for a low-nibble tile, 0 for a high one
        return tirx.reinterpret("int8", (p << shift.astype("uint8")) & tirx.const(0xF0, "uint8"))

    return te.compute((ntiles, ktiles, _TILE, _TILE), tile, name="W16")


def _gemm(a_at, w: te.Tensor, shape: tuple, kpad: int) -> te.Tensor:
    """``acc[..., j] = sum_k a_at(..., k) * w[j/4, k/4, j%4, k%4]`` in int32 over the padded K."""
    r = te.reduce_axis((0, kpad), name="k")
    return te.compute(
        shape, lambda *idx: te.sum(a_at(*idx[:-1], r).astype("int32")
                                   * w[idx[-1] // 4, r // 4, idx[-1] % 4, r % 4].astype("int32"), axis=r),
        name="acc")


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


def dense_kernel(k: int, n: int, intrin: str, int4: bool = False) -> tirx.PrimFunc:
    """``A[m, K] int8 x Wp[N/4, K/4, 4, 4] int8 -> C[m, N] int32`` for any batch ``m``; K % 4 == 0.

    With ``int4`` the weight is :func:`pack_weight_int4`'s ``[N/4, K/8, 4, 4]``
    uint8 (K % 8 == 0), unpacked one 4x4 tile at a time next to its use.
    """
    m = tirx.Var("m", "int64")
    npad = _ceil4(n)
    a = te.placeholder((m, k), "int8", name="A")
    if int4:
        w = te.placeholder((npad // _TILE, k // (2 * _TILE), _TILE, _TILE), "uint8", name="W")
        w16 = _unpacked(w, npad // _TILE, k // _TILE)
        acc = _gemm(lambda i, r: a[i, r], w16, (m, npad), k)
        out = te.compute((m, n), lambda i, j: acc[i, j] >> 4, name="C")  # exact: a multiple of 16
    else:
        w = te.placeholder((npad // _TILE, k // _TILE, _TILE, _TILE), "int8", name="W")
        acc = _gemm(lambda i, r: a[i, r], w, (m, npad), k)
        # N % 4 != 0: the padded [m, N+pad] product, then a copy (compute_at would cut the tile)
        out = acc if npad == n else te.compute((m, n), lambda i, j: acc[i, j], name="C")
    sch = s_tir.Schedule(te.create_prim_func([a, w, out]))
    blk = sch.get_sblock("acc")
    ko = _tile_gemm(sch, blk, outer=1)
    if int4:
        sch.compute_at(sch.get_sblock("W16"), ko)
    _tensorize_gemm(sch, blk, ko, intrin)
    return _finish(sch)


def conv2d_kernel(shape: tuple, wshape: tuple, strides, padding, dilation, intrin: str,
                  int4: bool = False) -> tirx.PrimFunc:
    """NCHW int8 conv as im2col GEMM: ``data[n, C, H, W]``, ``Wp[O/4, K/4, 4, 4]``, K = C*R*S.

    ``shape`` is ``(C, H, W)`` of the data; the batch stays symbolic. With
    ``int4`` the weight is :func:`pack_weight_int4`'s (K padded to 8).
    """
    c, h, wd = shape
    o, _, kr, ks = wshape
    (sh, sw), (dh, dw) = strides, dilation
    pt, pl, pb, pr = padding
    oh = (h + pt + pb - (kr - 1) * dh - 1) // sh + 1
    ow = (wd + pl + pr - (ks - 1) * dw - 1) // sw + 1
    kk, opad = c * kr * ks, _ceil4(o)
    kpad = _ceil8(kk) if int4 else _ceil4(kk)
    nb = tirx.Var("n", "int64")  # any batch: one kernel serves every call site of this layer shape
    data = te.placeholder((nb, c, h, wd), "int8", name="data")
    if int4:
        w = te.placeholder((opad // _TILE, kpad // (2 * _TILE), _TILE, _TILE), "uint8", name="W")
        wt = _unpacked(w, opad // _TILE, kpad // _TILE)
    else:
        w = wt = te.placeholder((opad // _TILE, kpad // _TILE, _TILE, _TILE), "int8", name="W")

    def im2col(b, y, x, q):
        ci, rr, ss = q // (kr * ks), q % (kr * ks) // ks, q % ks
        iy, ix = y * sh + rr * dh - pt, x * sw + ss * dw - pl
        inside = tirx.all(q < kk, iy >= 0, iy < h, ix >= 0, ix < wd)
        return tirx.if_then_else(inside, data[b, ci, iy, ix], tirx.const(0, "int8"))

    col = te.compute((nb, oh, ow, kpad), im2col, name="col")
    acc = _gemm(lambda b, y, x, r: col[b, y, x, r], wt, (nb, oh, ow, opad), kpad)
    out = te.compute((nb, o, oh, ow), lambda b, j, y, x: acc[b, y, x, j] >> 4 if int4 else acc[b, y, x, j],
                     name="out")
    sch = s_tir.Schedule(te.create_prim_func([data, w, out]))
    blk = sch.get_sblock("acc")
    ko = _tile_gemm(sch, blk, outer=3)
    # one im2col row per output pixel, reused across all output channels
    sch.compute_at(sch.get_sblock("col"), sch.get_loops(blk)[2])
    if int4:
        sch.compute_at(sch.get_sblock("W16"), ko)
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
        int4 = fits_int4(w) and k % (2 * _TILE) == 0  # a 4-bit layer: packed, half the weight bytes
        gv = self.kernel(("dense", k, n) + (("int4",) if int4 else ()),
                         lambda name: dense_kernel(k, n, self.intrin, int4).with_attr("global_symbol", name))
        wp = pack_weight_int4(w.T) if int4 else pack_weight(w.T)
        return relax.call_tir(gv, [call.args[0], relax.const(wp)], call.ty)

    def conv2d(self, call: relax.Call, x: tuple, w: np.ndarray, strides: list, padding: list,
               dilation: list) -> relax.Expr | None:
        int4 = fits_int4(w)
        key = ("conv2d", *x[1:], *w.shape, *strides, *padding, *dilation) + (("int4",) if int4 else ())
        gv = self.kernel(key, lambda name: conv2d_kernel(x[1:], w.shape, strides, padding, dilation,
                                                         self.intrin, int4).with_attr("global_symbol", name))
        flat = w.reshape(w.shape[0], -1)
        wp = pack_weight_int4(flat) if int4 else pack_weight(flat)
        return relax.call_tir(gv, [call.args[0], relax.const(wp)], call.ty)
