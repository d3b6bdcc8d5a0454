"""AMX dense ``C[M, N] = A[M, K] x B[K, N]``: int8 (``tdpbusd``) and bf16 (``tdpbf16ps``).

Layouts (packed once, at compile time, in numpy):

* int8: A uint8, B int8 in the VNNI order of ``hago.backends.x86.vnni``
  ``[Np/16, Kp/4, 16, 4]``: per 16-column block ``[K/4][16][4]``, so each
  64-byte row is one B tile row and a 64-deep K step of a block is 1 KiB of
  contiguous bytes; C int32, bit-exact (u8 x s8 products summed in int32).
* bf16: A and B rounded to bf16 (nearest even), B ``[Np/16, Kp/2, 16, 2]``;
  C fp32 (products exact, sums rounded in fp32 by the tile unit).

K is zero-padded to the 64-byte tile row (64 int8 / 32 bf16), N to the
``16 * nt`` columns of a block. M: up to 16 rows run as one row tile of
exactly M rows (M = 1 does one row of work, not 16), more as two 16-row
tiles with M zero-padded to 32. A is copied into that padded (and, for bf16,
rounded) ``[Mp, Kp]`` buffer by a scheduled TE PrimFunc (``PACK_A``) only
when needed; B and the bias are numpy constants.

The kernel is TIR written by hand (``dense_kernel_func``), not a TE compute
to schedule: the tile state does not fit a tensor intrinsic's description
(it lives across the whole K loop, in registers named by immediates), and
the tile configuration (~150 cycles) must run once per parallel task, not
per block. The loop nest: the permission check (``amx_ir.REQUEST_FN``: a
one-line error instead of SIGILL), then a parallel loop over a grid of
tasks (``task_grid``), each a rectangle of ``(mt*rows) x (nt*16)`` output
blocks. A task configures the tiles, runs its blocks (row blocks outer: one
A block stays in L1 while the task's part of B streams from L2) through the
LLVM IR micro-kernel (``amx_ir``), and releases the tiles. A block inside
``[M, N]`` stores its C tiles straight into the output; a ragged edge block
stores them into a small buffer that a TIR loop copies without the padding
(the place for the coming int8 requantize epilogue). The bf16 C tiles start
from the bias, so it costs no pass of its own.

Only the parameters are read through ``address_of``; the output and the
tile buffer are ``access_ptr`` with the extent written (see
``dense_kernel_func``).
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax import op as O
from tvm.script import tirx as T

from hago import tvmscript  # noqa: F401  (T.macro calls without reading source files)
from hago.errors import QuantizeError
from hago.tvm_consts import IS_SCHEDULED, KERNEL_ATTR, OPAQUE

from ..x86.bf16 import to_bf16  # one rounding for every bf16 kernel
from . import amx_ir
from .amx_ir import IMPORT_PRAGMA, OPS, RELEASE_FN, REQUEST_FN

DENSE_AMX = {"int8": "dense_amx_int8", "bf16": "dense_amx_bf16"}
PACK_A = "pack_amx_a"  # A -> [Mp, Kp] (padded; bf16: rounded)
LANES = 16  # C columns per tile (16 x 32-bit)
BF16 = "bfloat16"
#: dtype -> (A dtype, B numpy dtype, C dtype, K values per B tile row group)
DTYPES = {"int8": ("uint8", np.int8, "int32", 4), "bf16": (BF16, ml_dtypes.bfloat16, "float32", 2)}
PERMISSION_MESSAGE = ("hago AMX kernel: Linux refused AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, "
                      "XFEATURE_XTILEDATA) failed: needs x86-64 Linux >= 5.16 on a CPU with AMX)")


def _up(v: int, m: int) -> int:
    return -(-v // m) * m


def row_tiles(m: int) -> tuple[int, int, int]:
    """``(mt, rows, mp)``: row tiles per block, rows per tile and padded M for ``m`` rows."""
    return (1, m, m) if m <= 16 else (2, 16, _up(m, 32))


def col_tiles(n: int) -> int:
    """Column tiles per block: 2 (32 columns) unless all of N fits one 16-column tile."""
    return 1 if n <= LANES else 2


def k_pad(k: int, dtype: str) -> int:
    """K padded to whole 64-byte tile rows."""
    return _up(k, OPS[dtype][1])


def pack_dense_weight(w_kn: np.ndarray, dtype: str) -> np.ndarray:
    """``[K, N] -> [Np/16, Kp/g, 16, g]`` (g = 4 int8, 2 bf16), zero-padded to the tile sizes.

    int8 weights must be int8; bf16 ones are float (rounded to nearest even here).
    """
    _, bdtype, _, g = DTYPES[dtype]
    k, n = w_kn.shape
    kp, np_ = k_pad(k, dtype), _up(n, LANES * col_tiles(n))
    w = np.zeros((kp, np_), bdtype)
    w[:k, :n] = w_kn if dtype == "int8" else to_bf16(w_kn)
    return np.ascontiguousarray(w.T.reshape(np_ // LANES, LANES, kp // g, g).transpose(0, 2, 1, 3))


# ---- A packing (TE, scheduled here) --------------------------------------------
def _pack_a_te(a, mp: int, kp: int, dtype: str):
    """``[M, K] -> [mp, kp]`` in the kernel's A dtype, zero outside ``[M, K]`` (bf16: rounded, nearest even)."""
    m, k = (int(s) for s in a.shape)
    adtype = DTYPES[dtype][0]
    if adtype == BF16:  # a bfloat16 literal reaches BF16StorageLegalize as a bf16 broadcast: use the bits
        zero = tirx.reinterpret(BF16, tirx.const(0, "uint16"))
    else:
        zero = tirx.const(0, adtype)

    def body(i, j):
        conds = ([i < m] if mp != m else []) + ([j < k] if kp != k else [])
        # padded axes read clamped indices: a vectorized loop loads every lane before it selects
        v = a[tirx.min(i, m - 1) if mp != m else i, tirx.min(j, k - 1) if kp != k else j]
        v = v if str(v.dtype) == adtype else v.astype(adtype)
        return tirx.if_then_else(tirx.all(*conds), v, zero) if conds else v

    return te.compute((mp, kp), body, name=PACK_A, attrs={KERNEL_ATTR: PACK_A})


def schedule_pack_a(sch, blk) -> None:
    """The A packing: rows in parallel, K in vectors of 16 (whole zmm registers of fp32 input)."""
    i, j = sch.get_loops(blk)
    sch.parallel(i)
    if int(sch.get(j).extent) % LANES == 0 and int(sch.get(j).extent) > LANES:
        j = sch.split(j, [None, LANES])[-1]
    sch.vectorize(j)


def pack_a_func(m: int, k: int, in_dtype: str, dtype: str) -> tirx.PrimFunc:
    """The scheduled PrimFunc ``[m, k] in_dtype -> [Mp, Kp]`` A operand of the ``dtype`` kernel."""
    from tvm.s_tir import Schedule

    a = te.placeholder((m, k), in_dtype, name="a")
    out = _pack_a_te(a, row_tiles(m)[2], k_pad(k, dtype), dtype)
    sch = Schedule(tvm.IRModule({"main": te.create_prim_func([a, out])}))
    schedule_pack_a(sch, sch.get_sblock(PACK_A))
    func = sch.mod["main"].with_attr(IS_SCHEDULED, True).with_attr("op_pattern", OPAQUE)
    return func.without_attr("global_symbol")


# ---- the kernel (hand-written TIR) -------------------------------------------
def task_grid(nmb: int, nnb: int, chunks: int) -> tuple[int, int]:
    """``(cm, cn)``: parallel tasks along the row and the column blocks, ``cm * cn <= chunks``.

    Each task gets a contiguous range of row blocks and of column blocks;
    the grid minimises the largest task and, on a tie, splits the columns
    (the tasks then read disjoint parts of B, usually the larger operand).
    """
    best = None
    for cn in range(1, min(nnb, chunks) + 1):
        for cm in range(1, min(nmb, chunks // cn) + 1):
            work = -(-nmb // cm) * -(-nnb // cn)
            key = (work, -cn, -cm)
            if best is None or key < best[0]:
                best = (key, cm, cn)
    return best[1], best[2]


def dense_kernel_func(dtype: str, m: int, n: int, k: int, chunks: int, request_permission: bool = True):
    """The AMX dense PrimFunc, see the module docstring.

    int8: ``(A [Mp, Kp] u8, B packed s8, C [m, n] s32)``; bf16: ``(A [Mp,
    Kp] bf16, B packed bf16, bias [Np] f32 (zero-padded), C [m, n] f32)``.
    The bf16 C tiles start from the bias (a tile load with row stride 0
    repeats one row), so every block inside C is stored there directly and
    only the ragged edge blocks go through the tile buffer.

    ``chunks``: parallel tasks (the thread count; each configures the tiles
    once). Within a task the row blocks are the outer loop: one A block
    (``mt*16`` rows x Kp) stays in L1 while the task's part of B streams
    from L2. ``request_permission=False`` leaves out the permission check:
    a process that did not ask for AMX then dies with SIGILL (for tests).
    """
    adtype, _, cdtype, g = DTYPES[dtype]
    mt, rows, mp = row_tiles(m)
    nt = col_tiles(n)
    kp = k_pad(k, dtype)
    np_ = _up(n, LANES * nt)
    bm, bn = mt * rows, nt * LANES
    nmb, nnb = mp // bm, np_ // bn
    cm, cn = task_grid(nmb, nnb, max(1, int(chunks)))
    ksteps = kp // OPS[dtype][1]  # 64-byte K steps
    esize = 1 if dtype == "int8" else 2
    lda = kp * esize  # bytes per A row
    bnext = kp * LANES * esize  # bytes per 16-column block of B
    load_c = dtype == "bf16"  # C starts from the bias
    ir = amx_ir.micro_kernel_ir(dtype, mt, nt, rows, load_c)
    kname, cfg = amx_ir.kernel_name(dtype, mt, nt, load_c), amx_ir.config_fn(mt, nt, rows)
    ldc_acc, ldc_out = bn * 4, n * 4
    full_m, full_n = m % bm == 0, n % bn == 0
    check = bool(request_permission)
    attrs = {"tir.noalias": True, KERNEL_ATTR: DENSE_AMX[dtype], IS_SCHEDULED: True, "op_pattern": OPAQUE}
    i64 = T.int64
    # The tile stores' targets are access_ptr with the extent they write: TVM compacts a local buffer to the
    # region its accesses name, and address_of(acc[0, 0]) names one element (that shrank the C tile buffer to
    # 64 bytes of stack under 4 KiB of tile stores). A, B and bias are parameters (never compacted) and stay
    # address_of: an access_ptr of a bf16 buffer fails TVM's bf16 legalization (uint16 storage).

    @T.macro
    def blocks(A, B, C, cinit, ldinit):
        """The task's blocks: ``cinit(n0)`` is where the C tiles of column block ``n0`` start (stride ``ldinit``)."""
        for t in T.parallel(cm * cn, annotations={IMPORT_PRAGMA: ir}):
            acc = T.decl_buffer((bm, bn), cdtype, align=64)
            T.call_extern("void", cfg)
            for mb in T.serial(t // cn * nmb // cm, (t // cn + 1) * nmb // cm):
                for nb in T.serial(t % cn * nnb // cn, (t % cn + 1) * nnb // cn):
                    m0 = T.meta_var(mb * bm)
                    n0 = T.meta_var(nb * bn)
                    a_ptr = T.meta_var(T.address_of(A[m0, 0]))
                    b_ptr = T.meta_var(T.address_of(B[nb * nt, 0, 0, 0]))
                    if (full_m or m0 + bm <= m) and (full_n or n0 + bn <= n):  # inside C: store there
                        T.call_extern("void", kname, a_ptr, i64(lda), b_ptr, i64(bnext), cinit(n0), i64(ldinit),
                                      C.access_ptr("w", offset=m0 * n + n0, extent=(bm - 1) * n + bn),
                                      i64(ldc_out), i64(ksteps))
                    else:
                        T.call_extern("void", kname, a_ptr, i64(lda), b_ptr, i64(bnext), cinit(n0), i64(ldinit),
                                      acc.access_ptr("w"), i64(ldc_acc), i64(ksteps))
                        for i, j in T.grid(bm, bn):
                            if m0 + i < m and n0 + j < n:
                                C[m0 + i, n0 + j] = acc[i, j]
            T.call_extern("void", RELEASE_FN)

    if dtype == "int8":
        @T.prim_func
        def kernel(A: T.Buffer((mp, kp), adtype), B: T.Buffer((np_ // LANES, kp // g, LANES, g), "int8"),
                   C: T.Buffer((m, n), cdtype)):
            T.func_attr(attrs)
            if check:
                rc = T.call_extern("int32", REQUEST_FN)
                assert rc == 0, PERMISSION_MESSAGE
            blocks(A, B, C, lambda n0: T.address_of(A[0, 0]), 0)  # C starts at zero: cinit unused

        return kernel.without_attr("global_symbol")  # the module names it (bb.add_func)

    @T.prim_func
    def kernel_bf16(A: T.Buffer((mp, kp), adtype), B: T.Buffer((np_ // LANES, kp // g, LANES, g), BF16),
                    bias: T.Buffer((np_,), "float32"), C: T.Buffer((m, n), cdtype)):
        T.func_attr(attrs)
        if check:
            rc = T.call_extern("int32", REQUEST_FN)
            assert rc == 0, PERMISSION_MESSAGE
        blocks(A, B, C, lambda n0: T.address_of(bias[n0]), 0)  # every row of a C tile starts as the bias

    return kernel_bf16.without_attr("global_symbol")


# ---- Relax emitter --------------------------------------------------------------
def default_threads() -> int:
    """The parallel tasks of a kernel: the current target's ``num-cores``, else this machine's CPU count."""
    target = tvm.target.Target.current(allow_none=True)
    cores = target.attrs.get("num-cores") if target is not None else None
    return int(cores) if cores else (os.cpu_count() or 1)


def _static_shape(bb: relax.BlockBuilder, x: relax.Expr, dtypes: tuple[str, ...], what: str) -> list[int]:
    ty = bb.normalize(x).ty
    if str(ty.dtype) not in dtypes:
        raise QuantizeError(f"{what}: AMX kernel takes {' or '.join(dtypes)} activations, got {ty.dtype}")
    try:
        return [int(s) for s in ty.shape.values]
    except (TypeError, AttributeError):
        raise QuantizeError(f"{what}: AMX kernels need a static input shape, got {ty.shape}") from None


def emit_dense_amx(bb: relax.BlockBuilder, x: relax.Expr, w_kn: np.ndarray, dtype: str = "int8", bias=None,
                   threads: int | None = None, request_permission: bool = True) -> relax.Expr:
    """``x @ w`` through AMX for ``x [..., K]`` and numpy ``w [K, N]``; leading dims of ``x`` flattened into M.

    * ``dtype="int8"``: uint8 ``x``, int8 ``w`` -> int32 ``[..., N]``,
      bit-identical to ``matmul(x, w, out_dtype="int32")`` (no bias: a
      requantize epilogue will take it).
    * ``dtype="bf16"``: fp32 (or bf16) ``x``, float ``w``, optional fp32
      ``bias [N]`` -> fp32 ``[..., N]``: inputs rounded to bf16 (nearest
      even), products summed in fp32.

    ``threads``: parallel tasks (default ``default_threads()``). The target
    must have AMX (``mcpu`` sapphirerapids or later): the kernel's LLVM IR
    does not compile without it.
    """
    if dtype not in DTYPES:
        raise QuantizeError(f"dense: AMX dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    w = np.asarray(w_kn)
    if dtype == "int8":
        xs = _static_shape(bb, x, ("uint8",), "dense")
        if w.dtype != np.int8:
            raise QuantizeError(f"dense: AMX int8 weights must be int8 numpy arrays, got {w.dtype}")
        if bias is not None:
            raise QuantizeError("dense: the AMX int8 kernel returns the int32 accumulator; add the bias after it")
    else:
        xs = _static_shape(bb, x, ("float32", BF16), "dense")
        if w.dtype.kind != "f" and w.dtype != ml_dtypes.bfloat16:
            raise QuantizeError(f"dense: AMX bf16 weights must be float numpy arrays, got {w.dtype}")
    if len(xs) < 1 or w.ndim != 2 or xs[-1] != w.shape[0]:
        raise QuantizeError(f"dense {xs} x {list(w.shape)}: shapes do not match")
    k, n = (int(s) for s in w.shape)
    m = int(np.prod(xs[:-1], dtype=np.int64)) if len(xs) > 1 else 1
    a = x if len(xs) == 2 else bb.emit(O.reshape(x, (m, k)))
    _, _, mp = row_tiles(m)
    kp = k_pad(k, dtype)
    in_dtype = str(bb.normalize(a).ty.dtype)
    if mp != m or kp != k or in_dtype != DTYPES[dtype][0]:
        pack = bb.add_func(pack_a_func(m, k, in_dtype, dtype), f"hago_pack_amx_{dtype}")
        a = bb.emit(relax.call_tir(pack, [a], relax.TensorType((mp, kp), DTYPES[dtype][0])))
    func = dense_kernel_func(dtype, m, n, k, threads or default_threads(), request_permission)
    gv = bb.add_func(func, f"hago_dense_amx_{dtype}")
    args = [a, relax.const(tvm.runtime.tensor(pack_dense_weight(w, dtype)))]
    if dtype == "bf16":
        b = np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
        if b.shape != (n,):
            raise QuantizeError(f"dense: bias has {b.size} values for {n} outputs")
        padded = np.zeros(_up(n, LANES * col_tiles(n)), np.float32)  # the last block's tile load reads Np columns
        padded[:n] = b
        args.append(relax.const(padded))
    out = bb.emit(relax.call_tir(gv, args, relax.TensorType((m, n), DTYPES[dtype][2])))
    if len(xs) != 2:
        out = bb.emit(O.reshape(out, (*xs[:-1], n)))
    return out
