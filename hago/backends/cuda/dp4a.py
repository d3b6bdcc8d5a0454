"""Integer dense / conv2d on CUDA as pre-scheduled ``__dp4a`` GEMM kernels.

dlight's GPU rules (the default Relax CUDA pipeline) schedule an int8 x int8
-> int32 matmul as a plain loop nest: no ``__dp4a``, so an int8 build runs no
faster than FP32. MetaSchedule's ``MultiLevelTilingWithIntrin("dp4a_s8s8s32")``
does emit dp4a, but on hago's symbolic batch its design space leaves the batch
axis untiled (one row per thread block), picking among its samples needs a GPU
to measure on, and loading its intrinsics costs ~45 s per process. This module
therefore writes the kernels itself, the way ``hago.backends.arm`` does for NEON/SDOT:
each eligible op becomes a ``call_tir`` to a TE kernel with a fixed schedule
(the shared swap of :mod:`hago.backends.int8_swap`).

Both ops are one GEMM ``C[b, i, j] = sum_k L[i, k] * R[b, j, k]`` (the batch
``b`` only for conv), with K padded to a multiple of the 16-byte k step:

* dense ``x[m, K] @ w[K, N]``: ``i = m`` (the symbolic batch), ``j = n`` over
  the weights stored ``[N, K]``;
* conv2d NCHW/OIHW: ``i = o`` over the weights ``[O, C*R*S]``, ``j`` the output
  pixel, and ``R`` the im2col of the input, gathered straight into shared
  memory (never materialized). The kernel writes ``[n, O, OH*OW]``, which a
  free Relax ``reshape`` turns into NCHW.

Schedule: a block of (BI/4) x (BJ/4) threads owns a BI x BJ output tile; each
thread keeps a 4x4 int32 tile in registers. The k loop stages 16-wide slices
of both operands in shared memory (row stride padded to 20 bytes against bank
conflicts) and each 4-wide slice is one ``__dp4a``. Out-of-range rows, columns
and k are zero-filled on load (zeros add nothing) and masked on store, so any
batch is safe. Weights are constants, packed and zero-padded once in numpy.
Integer sums are exact: results equal the naive kernel's bit for bit.

**4-bit weights** (every value in [-8, 7]: a layer quantized to 4 bits, which
``cuda-t4`` declares) ship two per byte, ``[rows, K/2]`` uint8 with each 8 k
values of a row in 4 bytes (low nibbles k 8g..8g+3, high nibbles 8g+4..8g+7,
:func:`pack_rows_int4`). The shared-memory stage that already pads and gathers
the weights unpacks them on the way in: ``p << 4`` and ``p & 0xF0`` read as
signed bytes are 16x the low and high weight (no nibble is sign-extended,
:mod:`hago.backends.nibbles`), so global memory is read at half the bytes, the
same ``__dp4a`` multiplies, and the output stage shifts the int32 sum right by
4, exactly. (T4's int4 tensor-core MMA would take 4-bit activations too: W4A4
stays simulated, as on every CPU.)
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
from . import intrin

log = logging.getLogger(__name__)

KERNEL_PREFIX = "hago_dp4a_"
BK = 16  # k bytes staged in shared memory per step (four dp4a)
T4 = 4  # outputs per thread along each tile axis


def _tile(extent: int | None, cap: int = 64) -> int:
    """Tile edge for one GEMM axis: ``cap``, or the power of two >= a smaller static extent (min 16)."""
    if extent is None:
        return cap
    return min(cap, max(16, 1 << (int(extent) - 1).bit_length()))


def _schedule_gemm(sch: s_tir.Schedule, bi: int, bj: int, batched: bool) -> None:
    """Tile, stage and tensorize the ``C`` block; see the module docstring.

    ``batched`` is the conv case: the batch goes on blockIdx.z and ``R`` is the
    im2col gather, staged pixel-fastest so neighbouring threads read
    neighbouring input columns (k-fastest elsewhere: rows are contiguous in k).
    """
    blk = sch.get_sblock("C")
    loops = sch.get_loops(blk)
    ty_n, tx_n = bi // T4, bj // T4
    io, ti, ii = sch.split(loops[-3], [None, ty_n, T4])
    jo, tj, jj = sch.split(loops[-2], [None, tx_n, T4])
    ko, kk, k4 = sch.split(loops[-1], [None, BK // 4, 4])
    sch.reorder(io, jo, ti, tj, ko, kk, ii, jj, k4)
    # the symbolic axis goes on blockIdx.x (2^31 blocks); y and z allow only 65535
    if batched:
        sch.bind(loops[0], "blockIdx.z")
        sch.bind(jo, "blockIdx.x")
        sch.bind(io, "blockIdx.y")
    else:
        sch.bind(io, "blockIdx.x")
        sch.bind(jo, "blockIdx.y")
    sch.bind(ti, "threadIdx.y")
    sch.bind(tj, "threadIdx.x")
    acc = sch.cache_write(blk, 0, "local")
    for idx in (0, 1):
        stage = sch.cache_read(blk, idx, "shared")
        sch.compute_at(stage, ko)
        gather = batched and idx == 1
        # rows padded to 20 bytes: the 4-row thread tiles hit different banks; dp4a offsets stay 4-aligned
        sch.storage_align(stage, 0, axis=1 if gather else 0, factor=BK, offset=4)
        rows, cols = sch.get_loops(stage)[-2:]
        if gather:
            sch.reorder(cols, rows)
        fused = sch.fuse(cols, rows) if gather else sch.fuse(rows, cols)
        _, y, x = sch.split(fused, [None, ty_n, tx_n])
        sch.bind(y, "threadIdx.y")
        sch.bind(x, "threadIdx.x")
    for name in ("L_pad", "R_pad"):
        sch.compute_inline(sch.get_sblock(name))
    sch.compute_inline(acc)  # the output block now reads the register tile
    sch.reverse_compute_at(sch.get_sblock("out"), tj)
    sch.decompose_reduction(blk, ko)
    sch.tensorize(k4, intrin.register())


def _finish(sch: s_tir.Schedule, name: str, scheduled: bool) -> tirx.PrimFunc:
    # opaque: FuseOps leaves the kernel alone; is_scheduled: dlight does too
    func = sch.mod["main"].with_attrs({"op_pattern": OPAQUE, "global_symbol": name})
    return func.with_attr(IS_SCHEDULED, True) if scheduled else func


def _gemm_stages(lhs, rhs, ni, nj, kk: int, bi: int, bj: int, batch=None):
    """``L_pad``/``R_pad`` (zero outside ``ni``/``nj``/``kk``) and their product ``C``, tiles padded."""
    ip, jp, kp = (tirx.indexdiv(n + b - 1, b) * b for n, b in ((ni, bi), (nj, bj), (kk, BK)))
    zero = tirx.const(0, "int8")
    lp = te.compute((ip, kp), lambda i, k: tirx.if_then_else(tirx.all(i < ni, k < kk), lhs(i, k), zero),
                    name="L_pad")
    r = te.reduce_axis((0, kp), name="k")
    if batch is None:
        rp = te.compute((jp, kp), lambda j, k: tirx.if_then_else(tirx.all(j < nj, k < kk), rhs(j, k), zero),
                        name="R_pad")
        c = te.compute((ip, jp), lambda i, j: te.sum(lp[i, r].astype("int32") * rp[j, r].astype("int32"), axis=r),
                       name="C")
    else:
        rp = te.compute((batch, jp, kp),
                        lambda b, j, k: tirx.if_then_else(tirx.all(j < nj, k < kk), rhs(b, j, k), zero),
                        name="R_pad")
        c = te.compute((batch, ip, jp),
                       lambda b, i, j: te.sum(lp[i, r].astype("int32") * rp[b, j, r].astype("int32"), axis=r),
                       name="C")
    return c


def pack_rows_int4(w_rows: np.ndarray) -> np.ndarray:
    """int8 ``[R, K]`` in [-8, 7] -> uint8 ``[R, ceil(K/8)*4]``: per row, k values 8g..8g+3 in the low nibbles
    of bytes 4g..4g+3 and 8g+4..8g+7 in their high nibbles (zero padded)."""
    w = np.pad(w_rows, ((0, 0), (0, -w_rows.shape[1] % 8)))
    nib = (w.astype(np.int8).view(np.uint8) & 0x0F).reshape(w.shape[0], -1, 2, 4)
    return np.ascontiguousarray((nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(w.shape[0], -1))


def _weight(k: int, rows, int4: bool):
    """The weight placeholder ``[rows, K]`` int8 (or packed ``[rows, K/2]`` uint8) and its ``(row, k)`` reader,
    which gives 16x the weight for a packed one (``>> 4`` on the sum undoes it)."""
    if not int4:
        w = te.placeholder((rows, k), "int8", name="w")
        return w, lambda r, q: w[r, q]
    w = te.placeholder((rows, tirx.const(-(-int(k) // 8) * 4, "int64")), "uint8", name="w")

    def read(r, q):
        byte = w[r, q // 8 * 4 + q % 4]
        shift = (tirx.const(1, "int64") - q // 4 % 2) * 4  # 4: a low nibble, 0: a high one
        return tirx.reinterpret("int8", (byte << shift.astype("uint8")) & tirx.const(0xF0, "uint8"))

    return w, read


def dense_kernel(k: int, n: int, name: str, schedule: bool = True, rows: int | None = None,
                 int4: bool = False) -> tirx.PrimFunc:
    """``x[m, K] int8 x w[N, K] int8 -> [m, N] int32`` for any ``m``; ``rows``, a static m, only sizes tiles.

    With ``int4`` the weight is :func:`pack_rows_int4` of ``w[N, K]``.
    """
    m = tirx.Var("m", "int64")
    bi, bj = _tile(rows), _tile(n)
    kc, n = tirx.const(k, "int64"), tirx.const(n, "int64")  # one index type with the int64 batch
    x = te.placeholder((m, kc), "int8", name="x")
    w, read = _weight(kc, n, int4)
    c = _gemm_stages(lambda i, q: x[i, q], read, m, n, kc, bi, bj)
    out = te.compute((m, n), lambda i, j: c[i, j] >> 4 if int4 else c[i, j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, w, out]))
    if schedule:
        _schedule_gemm(sch, bi, bj, batched=False)
    return _finish(sch, name, schedule)


def conv2d_kernel(shape: tuple, wshape: tuple, strides, padding, dilation, name: str,
                  schedule: bool = True, int4: bool = False) -> tirx.PrimFunc:
    """NCHW int8 conv as an implicit-im2col GEMM: ``data[n, C, H, W]``, ``w[O, C*R*S]`` -> ``[n, O, OH*OW]``.

    With ``int4`` the weight is :func:`pack_rows_int4` of ``w[O, C*R*S]``.
    """
    _, c, h, wd = shape
    o, _, kr, ks = wshape
    (sh, sw), (dh, dw), (pt, pl) = strides, dilation, padding[:2]
    oh, ow = conv2d_out_hw(shape, wshape, strides, padding, dilation)
    kk, npix = c * kr * ks, oh * ow
    nb = tirx.Var("n", "int64") if shape[0] is None else shape[0]
    data = te.placeholder((nb, c, h, wd), "int8", name="data")
    w, read = _weight(kk, o, int4)

    def im2col(b, p, q):
        ci, rr, ss = q // (kr * ks), q % (kr * ks) // ks, q % ks
        iy, ix = p // ow * sh + rr * dh - pt, p % ow * sw + ss * dw - pl
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd)
        return tirx.if_then_else(inside, data[b, ci, iy, ix], tirx.const(0, "int8"))

    bi = _tile(o)
    bj = _tile(npix, cap=max(64, 4096 // bi))  # few output channels: wider pixel tiles, 256 threads
    acc = _gemm_stages(read, im2col, o, npix, kk, bi, bj, batch=nb)
    out = te.compute((nb, o, npix), lambda b, i, j: acc[b, i, j] >> 4 if int4 else acc[b, i, j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([data, w, out]))
    if schedule:
        _schedule_gemm(sch, bi, bj, batched=True)
    return _finish(sch, name, schedule)


def conv2d_out_hw(shape, wshape, strides, padding, dilation) -> tuple[int, int]:
    """Output height and width of an NCHW/OIHW conv; ``padding`` is (top, left, bottom, right)."""
    (_, _, h, wd), (_, _, kr, ks) = shape, wshape
    oh = (h + padding[0] + padding[2] - (kr - 1) * dilation[0] - 1) // strides[0] + 1
    ow = (wd + padding[1] + padding[3] - (ks - 1) * dilation[1] - 1) // strides[1] + 1
    return oh, ow


@mutator
class _Dp4a(Int8KernelSwap):
    """The shared int8 swap (:mod:`hago.backends.int8_swap`) with the dp4a GEMM kernels."""

    prefix = KERNEL_PREFIX

    def __init__(self, mod: tvm.IRModule, schedule: bool):
        super().__init__(mod)
        self.schedule = schedule

    def dense(self, call: relax.Call, x: tuple, w: np.ndarray) -> relax.Expr | None:
        if x[1] != w.shape[0]:
            return None
        k, n = w.shape
        int4 = fits_int4(w)  # a 4-bit layer: packed, half the weight bytes
        key = (("dense", k, n) if x[0] is None else ("dense", k, n, "m", x[0])) + (("int4",) if int4 else ())
        gv = self.kernel(key, lambda name: dense_kernel(k, n, name, self.schedule, rows=x[0], int4=int4))
        wt = np.ascontiguousarray(w.T)
        return relax.call_tir(gv, [call.args[0], relax.const(pack_rows_int4(wt) if int4 else wt)], call.ty)

    def conv2d(self, call: relax.Call, x: tuple, w: np.ndarray, strides: list, padding: list,
               dilation: list) -> relax.Expr | None:
        int4 = fits_int4(w)
        key = ("conv2d", *x[1:], *w.shape, *strides, *padding, *dilation) + (("int4",) if int4 else ())
        gv = self.kernel(key, lambda name: conv2d_kernel(
            (None, *x[1:]), w.shape, strides, padding, dilation, name, self.schedule, int4))
        oh, ow = conv2d_out_hw(x, w.shape, strides, padding, dilation)
        nb = call.ty.shape.values[0]
        flat = relax.TensorType([nb, w.shape[0], oh * ow], "int32")
        rows = w.reshape(w.shape[0], -1)
        y = self.builder_.emit(relax.call_tir(gv, [call.args[0], relax.const(pack_rows_int4(rows) if int4 else rows)],
                                              flat))
        return relax.op.reshape(y, call.ty.shape)


def apply_dp4a(mod: tvm.IRModule, schedule: bool = True) -> tvm.IRModule:
    """Replace int8 x int8 -> int32 ``matmul``/``conv2d`` with constant weights by dp4a kernels.

    Runs on the realized module, before ``tvm.compile``; needs sm_61 or newer.
    Ops it cannot take (grouped conv, other layouts, non-constant or N-D
    operands) stay as they are and are logged: dlight schedules them without
    dp4a. ``schedule=False`` keeps the kernels as plain loop nests, which any
    target builds: tests run them on the CPU to check the arithmetic.
    """
    rewriter = _Dp4a(mod, schedule)
    out = swap_kernels(mod, rewriter)
    if rewriter.skipped:
        log.warning("dp4a: %d integer ops left to dlight (no dp4a): %s", len(rewriter.skipped),
                    sorted(set(rewriter.skipped)))
    log.info("dp4a: %d integer ops on %d kernels", rewriter.count, len(rewriter.kernels))
    return out
