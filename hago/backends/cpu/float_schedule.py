"""Default schedules of the blocked float convolutions (:mod:`.float_kernels`), after fusion.

One register-blocked micro-kernel per conv, in the spirit of TOPI's
``conv2d_NCHWc`` x86 schedule and of MLAS's NCHWc kernels:

* the innermost ``ob`` output channels are one vector (16 floats on AVX-512);
* around it an unrolled tile of ``rw`` output columns x ``rc`` channel blocks
  of accumulators; per reduction step the tile loads ``rc`` weight vectors and
  broadcasts ``rw`` input values for ``rw * rc`` FMAs;
* all reductions (input channel blocks, kernel rows and columns, the channels
  of a block) run outside the tile; the fused element-wise epilogue (bias,
  ReLU/ReLU6, residual add) is computed on the tile as its write-back, so the
  accumulators never go to memory before it; a broadcast epilogue (a
  squeeze-excitation's scale fused into its one-pixel excitation conv) runs
  as a pass of its own after the conv;
* the output rows and channel blocks run in parallel.

Depthwise convs tile output columns only: each tap is one weight vector
reused across ``rw`` input vectors. Tile sizes divide the extents exactly
(no predicate inside the unrolled tile).
"""

from __future__ import annotations

from tvm.s_tir import Schedule

from hago.lower import divisors, register_tile
from hago.tvm_consts import KERNEL_ATTR

from .float_kernels import CONV, DEPTHWISE

DEPTHWISE_COLUMNS = 16  # accumulators of a depthwise tile, at most


def kernel_blocks(sch: Schedule, kinds=(CONV, DEPTHWISE)) -> list[tuple[str, object]]:
    """``(kind, block)`` of the blocks directly under the root annotated (``KERNEL_ATTR``) as one of ``kinds``."""
    out = []
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        kind = sch.get(blk).annotations.get(KERNEL_ATTR)
        if kind is not None and str(kind) in kinds:
            out.append((str(kind), blk))
    return out


def _extent(sch: Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _out_shape(sch: Schedule, blk) -> list[str]:
    """The shape ``blk`` writes, dims as text (a symbolic batch compares by name)."""
    return [str(d) for d in sch.get(blk).writes[0].source.shape]


def _epilogue(sch: Schedule, blk):
    """``(tile, wide)``: the blocks the conv's result flows into after inlining its element-wise chain.

    Every block after the conv is element-wise or a broadcast (FuseOps fuses
    no other consumer into a conv). ``tile``: the last block of the conv's
    own output shape (None if none); the chain before it is inlined into it,
    so it reads the accumulators and is the tile's write-back. ``wide``: the
    last block of a bigger shape (None if none), the rest of the chain inlined
    into it: a squeeze-excitation's scale (``x * sigmoid(conv(g))``, the conv
    one pixel, ``x`` 56x56) fuses into the excitation conv. Written back at
    the tile, that block was unrolled over the whole picture (9408 vector
    bodies: 6 minutes in LLVM and a slow kernel, EfficientNet-B0); it runs as
    a pass of its own after the conv instead, and the gate's sigmoid is
    computed once per channel, on the tile.
    """
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    after = names[names.index(sch.get(blk).name_hint) + 1:]
    shape = _out_shape(sch, blk)
    tile = [n for n in after if _out_shape(sch, sch.get_sblock(n)) == shape]
    wide = [n for n in after if n not in tile]
    for group in (tile, wide):
        for name in group[:-1]:
            sch.compute_inline(sch.get_sblock(name))
    return tuple(sch.get_sblock(group[-1]) if group else None for group in (tile, wide))


def _elementwise_pass(sch: Schedule, blk) -> None:
    """``blk`` as a loop nest of its own: the outer loops parallel, the last one (the channel lanes) vectorized."""
    loops = sch.get_loops(blk)
    if len(loops) > 1:
        outer = loops[:max(len(loops) - 2, 1)]
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.vectorize(loops[-1])


def _pad_blocks(sch: Schedule, blk) -> list:
    """The padding blocks before the conv ``blk``."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    return [sch.get_sblock(n) for n in names[:names.index(sch.get(blk).name_hint)]
            if "pad" in n and len(sch.get_loops(sch.get_sblock(n))) == 5]


def _prologue(sch: Schedule, blk, keep=()) -> None:
    """Blocks before the conv: padding runs parallel and vectorized over its channel lanes; others inline.

    ``keep``: padding blocks the caller places itself (left alone here)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    kept = {sch.get(b).name_hint for b in keep}
    for name in names[:names.index(sch.get(blk).name_hint)]:
        b = sch.get_sblock(name)
        loops = sch.get_loops(b)
        if name in kept:
            continue
        if len(loops) == 5 and "pad" in name:
            sch.parallel(sch.fuse(*loops[:3]))
            sch.vectorize(loops[-1])
        else:
            try:
                sch.compute_inline(b)
            except Exception:  # keeps its own loop nest
                pass


def _write_back(sch: Schedule, blk, outer: list) -> None:
    """The epilogue (or a cache of the accumulators) computed under ``outer[-1]``, unrolled, its lanes vectorized;
    a broadcast epilogue (:func:`_epilogue`'s ``wide``) as a pass of its own."""
    epi, wide = _epilogue(sch, blk)
    wb = epi if epi is not None else sch.cache_write(blk, 0, "global")
    if wide is not None:
        _elementwise_pass(sch, wide)
    sch.reverse_compute_at(wb, outer[-1])
    loops = sch.get_loops(wb)
    sch.vectorize(loops[-1])
    for loop in loops[len(outer):-1]:
        sch.unroll(loop)


def schedule_conv(sch: Schedule, blk, registers: int) -> None:
    n, oc, oh, ow, ob, ic, ry, rx, ri = sch.get_loops(blk)
    rw, rc = register_tile(_extent(sch, ow), _extent(sch, oc), registers)
    oco, oci = sch.split(oc, [None, rc])
    owo, owi = sch.split(ow, [None, rw])
    sch.reorder(n, oco, oh, owo, ic, ry, rx, ri, owi, oci, ob)
    _prologue(sch, blk)
    _write_back(sch, blk, [n, oco, oh, owo])
    sch.parallel(sch.fuse(n, oco, oh))
    sch.unroll(owi)
    sch.unroll(oci)
    sch.vectorize(ob)
    init = sch.decompose_reduction(blk, ic)
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_depthwise(sch: Schedule, blk, registers: int) -> None:
    """Per output row, the padded input rows it reads are made right there (a few KiB, in L1), not as a
    padded copy of the whole input: a MobileNet's first depthwise reads 4.8 MB, which the copy wrote and
    read again."""
    n, c, oh, ow, lanes, ry, rx = sch.get_loops(blk)
    rw = max(divisors(_extent(sch, ow), min(DEPTHWISE_COLUMNS, registers - 4)))
    owo, owi = sch.split(ow, [None, rw])
    sch.reorder(n, c, oh, owo, ry, rx, owi, lanes)
    pads = _pad_blocks(sch, blk)
    _prologue(sch, blk, keep=pads)
    _write_back(sch, blk, [n, c, oh, owo])
    row = sch.fuse(n, c, oh)
    sch.parallel(row)
    for pad in pads:
        sch.compute_at(pad, row)
        sch.vectorize(sch.get_loops(pad)[-1])
    sch.unroll(ry)
    sch.unroll(rx)
    sch.unroll(owi)
    sch.vectorize(lanes)
    init = sch.decompose_reduction(blk, ry)
    sch.vectorize(sch.get_loops(init)[-1])


SCHEDULES = {CONV: schedule_conv, DEPTHWISE: schedule_depthwise}


def schedule_float_kernels(sch: Schedule, registers: int = 32) -> bool:
    """Schedule the blocked float conv in ``sch`` (one PrimFunc, after fusion); False when it holds none.

    ``registers``: the target's vector register count (32 on AVX-512 and
    AArch64, 16 on AVX2). Raises ``ScheduleError`` when the schedule does not apply.
    """
    blocks = kernel_blocks(sch)
    if len(blocks) != 1:  # FuseOps never puts two reductions in one function
        return False
    kind, blk = blocks[0]
    SCHEDULES[kind](sch, blk, registers)
    return True
