"""Default (untuned) TIR schedules for the VNNI kernels of ``x86_vnni``.

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
"""

from __future__ import annotations

import logging

import tvm
from tvm.s_tir import Schedule, ScheduleError

from .vnni_intrin import vnni_intrin
from .x86_vnni import CONV, DENSE, FROM_NCHWC, KERNEL_ATTR, LANES, RED, TO_NCHWC

log = logging.getLogger(__name__)

MAX_ACC = 24  # of the 32 zmm registers: accumulators; the rest hold weights and a broadcast
MAX_BLOCKS = 4  # 16-lane weight vectors live at once


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def register_tile(rows: int, blocks: int) -> tuple[int, int]:
    """``(r, b)``: divisors of ``rows`` and ``blocks`` maximising r*b/(r+b), r*b <= MAX_ACC."""
    best = (0.0, 0, 1, 1)
    for b in _divisors(blocks, MAX_BLOCKS):
        for r in _divisors(rows, MAX_ACC // b):
            best = max(best, (r * b / (r + b), r * b, r, b))
    return best[2], best[3]


def _extent(sch: Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _finish(sch: Schedule, blk, reduce_loop, lane_loop, tile_loops, parallel_loops) -> None:
    """Write-back at the tile, parallel outer loops, init split off, tensorize the lanes."""
    acc = sch.cache_write(blk, 0, "global")
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
    sch.tensorize(lane_loop, vnni_intrin())


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


def schedule_conv(sch: Schedule, blk) -> None:
    """NCHW{b}c x OIHW{b/4}i16o4i: tile over output columns x 16-channel blocks."""
    n, oc, oh, ow, ob, ic, kh, kw, f, s = sch.get_loops(blk)
    rw, rc = register_tile(_extent(sch, ow), _extent(sch, oc))
    oco, oci = sch.split(oc, [None, rc])
    owo, owi = sch.split(ow, [None, rw])
    sch.reorder(n, oco, oh, owo, ic, kh, kw, f, owi, oci, ob, s)
    _finish(sch, blk, ic, ob, [owi, oci], [n, oco, oh, owo])


def schedule_to_nchwc(sch: Schedule, blk) -> None:
    """NCHW -> NCHW{b}c: parallel over (n, chunk, h), the b-lane gather vectorized."""
    n, cc, h, _, cb = sch.get_loops(blk)
    sch.parallel(sch.fuse(n, cc, h))
    sch.vectorize(cb)


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


_SCHEDULES = {DENSE: schedule_dense, CONV: schedule_conv, TO_NCHWC: schedule_to_nchwc,
              FROM_NCHWC: schedule_from_nchwc}


def _kernel_blocks(sch: Schedule) -> list[tuple[str, object]]:
    out = []
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        kind = sch.get(blk).annotations.get(KERNEL_ATTR)
        if kind is not None and str(kind) in _SCHEDULES:
            out.append((str(kind), blk))
    return out


def _is_scheduled(func: tvm.tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def schedule_func(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc | None:
    """The scheduled ``func``, or None when it holds no hago kernel block."""
    sch = Schedule(tvm.IRModule({"main": func}))
    blocks = _kernel_blocks(sch)
    if not blocks:
        return None
    try:
        for kind, blk in blocks:
            _SCHEDULES[kind](sch, blk)
    except (ScheduleError, tvm.error.InternalError) as e:  # unscheduled is slow but still correct
        log.warning("default VNNI schedule failed, the kernel stays naive: %s", str(e).strip().splitlines()[-1])
        return None
    # opaque to FuseOps (FuseTIR would merge an epilogue into a scheduled body); dlight skips it
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)


def has_vnni(target: tvm.target.Target) -> bool:
    """Whether ``target`` can run the 512-bit ``vpdpbusd`` these schedules emit."""
    from tvm.target.codegen import target_has_features

    return target.kind.name == "llvm" and bool(target_has_features("avx512vnni", target))


def schedule_vnni(mod: tvm.IRModule, target: tvm.target.Target | None = None) -> tvm.IRModule:
    """Apply the default VNNI schedules to every hago kernel PrimFunc in ``mod``.

    Runs after ``realize`` (the kernels are PrimFuncs from the moment
    ``emit_*_vnni`` emits them) and before ``tvm.compile``; every other
    function, and every function already scheduled (``tirx.is_scheduled``,
    e.g. by a MetaSchedule database), is left alone.

    Parameters
    ----------
    mod
        A Relax module, before or after ``LegalizeOps``; best before
        ``FuseOps`` so the kernels are still functions of their own.
    target
        The build target (default: ``Target.current()``). Without
        ``avx512vnni`` (skylake, AVX2-only CPUs, ARM) ``mod`` is returned
        unchanged: the naive kernels are slow but correct everywhere.
    """
    target = target or tvm.target.Target.current(allow_none=True)
    if target is not None and not has_vnni(target):
        log.info("target %s has no avx512vnni: VNNI kernels stay unscheduled", target)
        return mod
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and not _is_scheduled(func):
            new = schedule_func(func)
            if new is not None:
                updates[gv] = new
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod.update_func(gv, func)
    log.debug("scheduled %d VNNI kernels", len(updates))
    return mod


def ScheduleVNNI() -> tvm.transform.Pass:  # noqa: N802  (TVM pass naming)
    """``schedule_vnni`` as a module pass, for a ``tvm.transform.Sequential``."""

    @tvm.transform.module_pass(opt_level=0, name="hago.ScheduleVNNI")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return schedule_vnni(mod)

    return _pass
