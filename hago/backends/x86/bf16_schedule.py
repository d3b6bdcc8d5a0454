"""Default (untuned) TIR schedules for the bf16 kernels of ``bf16``.

The VNNI micro-kernel of ``vnni_schedule`` with ``vdpbf16ps`` in place of
``vpdpbusd``: the innermost 16 output lanes x 2 bf16 become one instruction
(``tensorize`` with ``bf16_intrin``), around it an unrolled ``rows x
lane-blocks`` tile of fp32 accumulators (``register_tile``: at most
``MAX_ACC`` zmm registers), reductions outside the tile, the output tile
loops fused and parallel. The write-back of each tile is where the bias is
added (``BIAS_EPILOGUE``, computed on the tile) and dense drops its N padding.

The layout conversions (which also round fp32 to bf16) are plain vector
code: the packing ones vectorized along the channel block, the write-back
to NCHW VNNI's transpose.
"""

from __future__ import annotations

from tvm.s_tir import Schedule

from .bf16 import BIAS_EPILOGUE, CAST_EPILOGUE, LANES, PAD_NCHWC_BF16, RED
from .bf16_intrin import bf16_intrin, link_shim
from .vnni_schedule import register_tile, schedule_from_nchwc

__all__ = ["schedule_conv_bf16", "schedule_dense_bf16", "schedule_from_nchwc_f32", "schedule_pad_nchwc_bf16",
           "schedule_to_bf16", "schedule_to_nchwc_bf16"]


def _extent(sch: Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _vectorize_lanes(sch: Schedule, loop) -> None:
    """Vectorize ``loop`` in whole zmm vectors where it allows (a longer loop is split first)."""
    if _extent(sch, loop) % LANES == 0 and _extent(sch, loop) > LANES:
        loop = sch.split(loop, [None, LANES])[-1]
    sch.vectorize(loop)


def _reblocks(sch: Schedule, blk, wb) -> bool:
    """Whether write-back ``wb`` stores another channel block than the accumulator's 16 (``NCHW8c`` output)."""
    acc, out = (list(sch.get(b).writes[0].source.shape) for b in (blk, wb))
    return len(acc) == len(out) == 5 and int(out[4]) != int(acc[4])


def _finish(sch: Schedule, blk, reduce_loop, lane_loop, tile_loops, parallel_loops, a_dtype: str = "bfloat16") -> None:
    """Write-back (or bias epilogue) at the tile, parallel outer loops, init split off, tensorize the lanes
    (``a_dtype``: how the broadcast operand is stored, :func:`.bf16_intrin.bf16_intrin`)."""
    epilogue = [c for c in sch.get_consumers(blk) if sch.get(c).name_hint == BIAS_EPILOGUE]
    wb = epilogue[0] if epilogue else sch.cache_write(blk, 0, "global")
    reblocked = _reblocks(sch, blk, wb)
    casts = [c for c in sch.get_consumers(wb) if sch.get(c).name_hint == CAST_EPILOGUE] if epilogue else []
    if not reblocked:
        sch.reverse_compute_at(wb, parallel_loops[-1])
        for cast in casts:  # a second output: the tile's values cast, read back from L1 right after
            sch.reverse_compute_at(cast, parallel_loops[-1])
            _vectorize_lanes(sch, sch.get_loops(cast)[-1])
    outer = sch.fuse(*parallel_loops) if len(parallel_loops) > 1 else parallel_loops[0]
    sch.parallel(outer)
    init = sch.decompose_reduction(blk, reduce_loop)
    for loop in tile_loops:
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    if reblocked:  # its own parallel pass over the accumulator: a tile cannot name an 8-channel block's part
        loops = sch.get_loops(wb)
        sch.parallel(sch.fuse(*loops[:3]))
        for cast in casts:  # and its cast on each of that pass's rows
            sch.reverse_compute_at(cast, sch.get_loops(wb)[0])
            _vectorize_lanes(sch, sch.get_loops(cast)[-1])
    _vectorize_lanes(sch, sch.get_loops(wb)[-1])
    sch.tensorize(lane_loop, bf16_intrin(a_dtype))
    link_shim(sch, outer)


def schedule_dense_bf16(sch: Schedule, blk) -> None:
    """``C[i, j] += A[i, k] * W[j/16, k/2, j%16, k%2]``: tile over rows x 16-lane blocks."""
    i, j, k = sch.get_loops(blk)
    mr, nr = register_tile(_extent(sch, i), _extent(sch, j) // LANES)
    io, ii = sch.split(i, [None, mr])
    jo, jn, ji = sch.split(j, [None, nr, LANES])
    ko, _ = sch.split(k, [None, RED])
    # columns outside rows: one weight panel (nr*16 x K bf16) stays in L2 for all rows
    sch.reorder(jo, io, ko, ii, jn, ji)
    _finish(sch, blk, ko, ji, [ii, jn], [jo, io])


def schedule_conv_bf16(sch: Schedule, blk) -> None:
    """NCHW{b}c x OIHW{b/2}i16o2i: tile over output columns x 16-channel blocks.

    A padding block in the same PrimFunc (``bf16.PAD_INSIDE``) is computed
    inside the channel-block loop of each tile: the ``kh x (rw * stride +
    kw - 1)`` input vectors that tile reads, from L1, instead of a pass over
    the whole input before the kernel.
    """
    n, oc, oh, ow, ob, ic, kh, kw, f, s = sch.get_loops(blk)
    rw, rc = register_tile(_extent(sch, ow), _extent(sch, oc))
    oco, oci = sch.split(oc, [None, rc])
    owo, owi = sch.split(ow, [None, rw])
    sch.reorder(n, oco, oh, owo, ic, kh, kw, f, owi, oci, ob, s)
    a_dtype = "bfloat16"
    for pad in sch.get_producers(blk):  # the input's own zero padding (bf16.PAD_INSIDE): the rows of each tile's
        if sch.get(pad).name_hint == PAD_NCHWC_BF16:  # channel block, padded just before the tile reads them
            sch.compute_at(pad, ic)
            sch.vectorize(sch.get_loops(pad)[-1])
            a_dtype = str(sch.get(pad).writes[0].source.dtype)
    _finish(sch, blk, ic, ob, [owi, oci], [n, oco, oh, owo], a_dtype)


def schedule_to_bf16(sch: Schedule, blk) -> None:
    """fp32 ``[M, K]`` -> bf16 ``[M, Kp]``: rows parallel, the rounding vectorized along K."""
    i, j = sch.get_loops(blk)
    sch.parallel(i)
    _vectorize_lanes(sch, j)


def _conversion(sch: Schedule, blk) -> None:
    """A packing block ``[n, chunk, h, w, lanes]``: parallel over (n, chunk, h), the lanes vectorized.

    The zero padding stays a bounds test on (h, w), outside the vector: VNNI's
    ``decompose_padding`` split needs a constant pad value, and a ``bfloat16``
    constant fill is what TVM's ``BF16StorageLegalize`` cannot store
    (``bf16._bf16_zero``).
    """
    n, cc, h, _, lanes = sch.get_loops(blk)
    sch.parallel(sch.fuse(n, cc, h))
    sch.vectorize(lanes)


#: fp32 NCHW -> bf16 NCHW{b}c (rounded, padded) and blocked fp32 -> bf16 (rounded, padded)
schedule_to_nchwc_bf16 = _conversion
schedule_pad_nchwc_bf16 = _conversion
#: the accumulator back to NCHW is VNNI's with fp32 in place of int32
schedule_from_nchwc_f32 = schedule_from_nchwc
