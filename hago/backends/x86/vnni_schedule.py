"""Default (untuned) TIR schedules for the VNNI kernels of ``vnni``.

With ``--tune-trials 0`` nothing else schedules these PrimFuncs, and the
naive loop nest runs one thread at 50-100x below the hardware. These
schedules follow TOPI's old x86 int8 ones (``dense_vnni_schedule``,
``schedule_conv2d_NCHWc_int8``) as one register-blocked micro-kernel:

* the innermost 16 output lanes x 4 reduction bytes become one ``vpdpbusd``
  (``tensorize`` with hago's LLVM-22 clean intrinsic, see ``vnni_intrin``);
* around it an unrolled ``rows x lane-blocks`` tile of int32 accumulators
  (``cache_write`` to a small local buffer, which LLVM keeps in zmm
  registers): per 4-byte reduction step it loads ``rows`` broadcasts and
  ``blocks`` weight vectors for ``rows * blocks`` multiply-adds;
* the reduction loops stay outside the tile, the output tile loops are fused
  and run in parallel, the zero-init and the write-back are vectorized.

Tile sizes are exact divisors (a ragged split puts a predicate on the
tensorized block, which ``tensorize`` rejects), chosen to maximise
multiply-adds per load with at most ``MAX_ACC`` accumulator registers.

``schedules`` maps each kernel block to its schedule here and
applies them (``schedule_vnni``).
"""

from __future__ import annotations

from tvm.s_tir import Schedule, ScheduleError

from .vnni_intrin import vnni_int4_intrin, vnni_intrin
from .vnni import CONV_EPILOGUE, LANES, RED
from .vnni_conv_int4 import CONV_INT4_SHIFT
from .vnni_int4 import DENSE_INT4_SHIFT

#: blocks that are their kernel's write-back, computed on the register tile
_EPILOGUES = (CONV_EPILOGUE, DENSE_INT4_SHIFT, CONV_INT4_SHIFT)

MAX_ACC = 24  # of the 32 zmm registers: accumulators; the rest hold weights and a broadcast
MAX_BLOCKS = 4  # 16-lane weight vectors live at once
MAX_BLOCKS_INT4 = 8  # the packed 4-bit dense: 16-lane blocks per tile


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def register_tile(rows: int, blocks: int) -> tuple[int, int]:
    """``(r, b)``: divisors of ``rows`` and ``blocks`` maximising r*b/(r+b), r*b <= MAX_ACC."""
    best = (0.0, 0, 1, 1)
    for b in _divisors(blocks, MAX_BLOCKS):
        for r in _divisors(rows, MAX_ACC // b):
            best = max(best, (r * b / (r + b), r * b, r, b))
    return best[2], best[3]


def int4_register_tile(rows: int, blocks: int) -> tuple[int, int]:
    """``(r, b)`` for the packed 4-bit dense: divisors of ``rows`` and ``blocks`` maximising the ``vpdpbusd``
    per other vector op.

    Per 8-k step a tile runs ``2rb`` ``vpdpbusd`` against ``b`` loads and
    ``3b`` unpacking ops (shared by the rows) and ``2r`` broadcasts, so the
    ratio is ``rb / (2b + r)``; its ``rb`` accumulators and ``2b``
    unpacked operands must leave two of the 32 zmm for the broadcasts (the
    ``0xF0`` mask is a memory operand).
    Batch 1 gets 8 blocks (4 would leave two chained ``vpdpbusd`` per
    accumulator exposed), 128 rows ``8 x 3`` (measured 10-15% faster than
    ``schedule_dense``'s ``4 x 4`` for this kernel).
    """
    best = (0.0, 0, 1, 1)
    for b in _divisors(blocks, MAX_BLOCKS_INT4):
        for r in _divisors(rows, MAX_ACC // b):
            if r * b + 2 * b <= 30:
                best = max(best, (r * b / (2 * b + r), r * b, r, b))
    return best[2], best[3]


def _extent(sch: Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _finish(sch: Schedule, blk, reduce_loop, lane_loop, tile_loops, parallel_loops, intrin=None) -> None:
    """Write-back at the tile, parallel outer loops, init split off, tensorize the lanes (with ``intrin``,
    default the 16x4 ``vpdpbusd``).

    An epilogue in the same PrimFunc (``_EPILOGUES``: the conv's requantize,
    the int4 dense's ``>> 4``) *is* the write-back, computed on the tile.
    """
    epilogue = [c for c in sch.get_consumers(blk) if sch.get(c).name_hint in _EPILOGUES]
    acc = epilogue[0] if epilogue else sch.cache_write(blk, 0, "global")
    sch.reverse_compute_at(acc, parallel_loops[-1])
    sch.parallel(sch.fuse(*parallel_loops) if len(parallel_loops) > 1 else parallel_loops[0])
    init = sch.decompose_reduction(blk, reduce_loop)
    for loop in tile_loops:
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    wb = sch.get_loops(acc)[-1]
    if _extent(sch, wb) % LANES == 0:
        wb = sch.split(wb, [None, LANES])[-1]
    sch.vectorize(wb)
    sch.tensorize(lane_loop, intrin or vnni_intrin())


def schedule_dense(sch: Schedule, blk) -> None:
    """``C[i, j] += A[i, k] * W[j/16, k/4, j%16, k%4]``: tile over rows x 16-lane blocks."""
    i, j, k = sch.get_loops(blk)
    mr, nr = register_tile(_extent(sch, i), _extent(sch, j) // LANES)
    io, ii = sch.split(i, [None, mr])
    jo, jn, ji = sch.split(j, [None, nr, LANES])
    ko, _ = sch.split(k, [None, RED])
    # columns outside rows: one weight panel (nr*16 x K bytes) stays in L2 for all rows
    sch.reorder(jo, io, ko, ii, jn, ji)
    _finish(sch, blk, ko, ji, [ii, jn], [jo, io])


def schedule_dense_int4(sch: Schedule, blk) -> None:
    """The packed 4-bit dense (:mod:`.vnni_int4`): ``schedule_dense``'s loops, 8 k (one packed load) per step,
    its own register tile (:func:`int4_register_tile`).

    The reduction is ``(ko, half, b)``: per ``ko`` one 64-byte load per lane
    block, unpacked into the two 16x4 operands of the intrinsic's two
    ``vpdpbusd``; the ``>> 4`` runs on the tile as its write-back.
    """
    i, j, ko, half, b = sch.get_loops(blk)
    mr, nr = int4_register_tile(_extent(sch, i), _extent(sch, j) // LANES)
    io, ii = sch.split(i, [None, mr])
    jo, jn, ji = sch.split(j, [None, nr, LANES])
    sch.reorder(jo, io, ko, ii, jn, ji, half, b)
    _finish(sch, blk, ko, ji, [ii, jn], [jo, io], vnni_int4_intrin())


def schedule_conv(sch: Schedule, blk) -> None:
    """NCHW{b}c x OIHW{b/4}i16o4i: tile over output columns x 16-channel blocks."""
    n, oc, oh, ow, ob, ic, kh, kw, f, s = sch.get_loops(blk)
    rw, rc = register_tile(_extent(sch, ow), _extent(sch, oc))
    oco, oci = sch.split(oc, [None, rc])
    owo, owi = sch.split(ow, [None, rw])
    sch.reorder(n, oco, oh, owo, ic, kh, kw, f, owi, oci, ob, s)
    _finish(sch, blk, ic, ob, [owi, oci], [n, oco, oh, owo])


def schedule_conv_int4(sch: Schedule, blk) -> None:
    """The packed 4-bit conv (:mod:`.vnni_conv_int4`): ``schedule_conv``'s loops, 8 input channels (one
    packed load per 16 output channels) per step, the packed dense's register tile (:func:`int4_register_tile`).

    The ``>> 4`` (its own block, or inside the requantize) runs on the tile as its write-back.
    """
    n, oc, oh, ow, ob, ic, kh, kw, g, half, s = sch.get_loops(blk)
    rw, rc = int4_register_tile(_extent(sch, ow), _extent(sch, oc))
    oco, oci = sch.split(oc, [None, rc])
    owo, owi = sch.split(ow, [None, rw])
    sch.reorder(n, oco, oh, owo, ic, kh, kw, g, owi, oci, ob, half, s)
    _finish(sch, blk, ic, ob, [owi, oci], [n, oco, oh, owo], vnni_int4_intrin())


def schedule_to_nchwc(sch: Schedule, blk) -> None:
    """NCHW -> NCHW{b}c: parallel over (n, chunk, h), the b-lane gather vectorized.

    With spatial padding: per (n, chunk) plane a vectorized fill with the pad
    value, then the condition-free copy of the rows in (``decompose_padding``;
    a bounds test in a vectorized loop would make it scalar).
    """
    n, cc, h, _, cb = sch.get_loops(blk)
    if _is_padding(sch, blk):
        plane = sch.fuse(n, cc)
        try:
            fill = sch.decompose_padding(blk, h)
        except ScheduleError:  # e.g. padded channels too: the bounds test stays
            sch.parallel(sch.fuse(plane, h))
            sch.vectorize(cb)
            return
        sch.parallel(plane)
        sch.vectorize(sch.fuse(*sch.get_loops(fill)[-2:]))
        sch.vectorize(sch.get_loops(blk)[-1])
        return
    sch.parallel(sch.fuse(n, cc, h))
    sch.vectorize(cb)


def schedule_pad_nchwc(sch: Schedule, blk) -> None:
    """Spatial zero-point padding of a blocked tensor: per plane a vectorized fill, then the rows copied in."""
    n, cc, h, _, _ = sch.get_loops(blk)
    plane = sch.fuse(n, cc)
    fill = sch.decompose_padding(blk, h)
    sch.parallel(plane)
    sch.vectorize(sch.fuse(*sch.get_loops(fill)[-2:]))
    sch.vectorize(sch.fuse(*sch.get_loops(blk)[-2:]))


def _is_padding(sch: Schedule, blk) -> bool:
    """Whether the block's value is a bounds-tested ``if_then_else`` (padding)."""
    v = getattr(sch.get(blk).body, "value", None)
    return str(getattr(getattr(v, "op", None), "name", "")).endswith("if_then_else")


def schedule_from_nchwc(sch: Schedule, blk) -> None:
    """NCHW16c -> NCHW: a 16-channel x w-tile transpose per step, stores vectorized along w."""
    n, o, h, w = sch.get_loops(blk)
    oc, ob = sch.split(o, [None, LANES])
    wt = next(t for t in (8, 16, 4, 2, 1) if _extent(sch, w) % t == 0)
    wo, wi = sch.split(w, [None, wt])
    sch.reorder(n, oc, h, wo, ob, wi)
    sch.parallel(sch.fuse(n, oc, h))
    sch.unroll(ob)
    sch.vectorize(wi)
