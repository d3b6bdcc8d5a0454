"""lower: the CPU build pipeline, with operator fusion and default schedules.

``tvm.compile``'s "default" Relax pipeline for CPU targets in TVM 0.27
legalizes but never fuses: every op of a requantize chain (cast, multiply,
abs, add, shift, where, clip, cast) becomes its own kernel with its own
full-size int64 temporary, and on ResNet-18 those ~400 tiny kernels cost
three times what the convolutions do. This module runs the fusing half of
``relax.backend.cpu_generic`` (LegalizeOps, AnnotateTIROpPattern,
FuseOps, FuseTIR) itself, then gives every fused PrimFunc that is purely
a default schedule: element-wise producers inlined into their consumer,
outer loops parallel and the innermost one vectorized; a naive reduction
(float conv, pooling, an integer conv without a hago kernel) at least runs
its outer loops in parallel. Functions already scheduled (hago's VNNI/ARM
kernels, records MetaSchedule applied) are left alone; tuning is what gives
reductions a real schedule.

Used by ``build.build`` (untuned) and ``tune.compile_cached`` (tuned), so a
build fuses the same way with or without records.
"""

from __future__ import annotations

import logging
import math

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.sym.pattern import detect_linear_equation

from . import stack_alloc
from .errors import error_line
from .tvm_consts import IS_SCHEDULED, OPAQUE

log = logging.getLogger(__name__)

VECTOR_BYTES = 64  # one zmm register; the split is rounded to what divides the extent
MIN_PARALLEL = 4096  # below this many elements a thread pool costs more than it saves
TILE_ROWS = 4  # register tile of a naive reduction (float conv, matmul): rows x vectors accumulators
TILE_VECTORS = 2
MAX_BLOCKS = 4  # weight vectors live at once in a register tile that fills the register file
#: accumulators of a tile with fewer rows (a batch-1 dense): vectors widen to keep this many FMA chains in flight
TILE_ACCUMULATORS = 8
MIN_TILES = 16  # parallel tiles a widened tile must leave (two threads, balanced)


def kernels_standalone(mod: tvm.IRModule, backend) -> tvm.IRModule:
    """``mod`` with ``backend``'s kernel PrimFuncs that carry no ``op_pattern`` yet marked opaque, so FuseOps keeps
    them standalone (tuning takes them as tasks of their own; an unscheduled one gets its default schedule after
    fusion through ``backend.schedule_fused``)."""
    out = mod
    for gv, func in mod.functions_items():
        if (isinstance(func, tvm.tirx.PrimFunc) and "op_pattern" not in (func.attrs or {})
                and backend.is_kernel(func)):
            if out is mod:
                out = mod.clone()
            out.update_func(gv, func.with_attr("op_pattern", OPAQUE))
    return out


def fuse(mod: tvm.IRModule, target: tvm.target.Target, backend=None) -> tvm.IRModule:
    """Dispatch, legalize and fuse ``mod`` (kernels marked opaque stay standalone).

    ``backend`` (a :class:`hago.backends.Backend`) may re-lay out the module
    first and legalize some ops itself (the CPU backends' blocked float convs).
    """
    legalize = cpu.legalize_passes(target)
    assert isinstance(legalize[0], type(relax.transform.LegalizeOps()))  # replaced by ours, with fast math
    custom = fast_math_legalizations()
    mod = opaque_symbolic_helpers(mod)
    if backend is not None:
        with target:
            mod = backend.prepare_fusion(mod, target)
        custom.update(backend.legalizations(target))
    passes = cpu.library_dispatch_passes(target) + [relax.transform.LegalizeOps(custom)]
    with target:
        return tvm.transform.Sequential(passes + legalize[1:])(mod)



def opaque_symbolic_helpers(mod: tvm.IRModule) -> tvm.IRModule:
    """Mark the PrimFuncs ``mod`` already holds whose buffers have symbolic dims opaque to FuseOps.

    Such a function is a helper the importer emitted with ``emit_te`` for the
    model's symbolic batch (TVM's ONNX importer does so for Einsum, Tile,
    non-constant Clip/Pad ...). Once ``main`` is bound to a static batch,
    FuseTIR cannot merge its ``[N, ...]`` buffers with a neighbour's
    ``[1, ...]`` ones ("Inconsistent buffers ... mapped to the same relax
    var"); called on its own, the helper binds ``N`` at run time and works.
    Functions with an ``op_pattern`` already (hago's kernels) are left alone.
    """
    def opaque(func):
        if "op_pattern" in (func.attrs or {}):
            return None
        dims = [d for buf in func.params if hasattr(buf, "shape") for d in buf.shape]  # params are buffers
        return func.with_attr("op_pattern", OPAQUE) if any(not isinstance(d, tvm.tirx.IntImm) for d in dims) else None

    return map_prim_funcs(mod, opaque)


def map_prim_funcs(mod: tvm.IRModule, fn) -> tvm.IRModule:
    """``mod`` with each PrimFunc replaced by ``fn(func)`` (None from it: left alone); ``mod`` itself if none is."""
    updates = {gv: new for gv, func in mod.functions_items()
               if isinstance(func, tvm.tirx.PrimFunc) and (new := fn(func)) is not None}
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod.update_func(gv, func)
    return mod


def fast_math_legalizations() -> dict:
    """Legalizations of float32 GELU / softmax / exp / erf / tanh / sigmoid / SiLU with TOPI's fast approximations.

    The exact ``erf`` and ``exp`` lower to scalar libm calls, which left
    GELU and softmax the largest kernels of a transformer (MiniLM: 28 of
    46 ms) once its dense layers ran in VNNI, and SiLU's sigmoid (one libm
    ``expf`` per lane) the largest cost of EfficientNet-B0's FP32 build. TOPI's polynomial versions
    vectorize; their error (~1e-6 relative) is far below any quantization
    step, and ONNX Runtime approximates the same functions. FP32 and integer
    builds go through this one pipeline, so both baselines get them.
    """
    from tvm import te, tirx, topi

    from . import fast_math

    def f32_only(name, fast):
        default = tvm.ir.Op.get(name).get_attr("FLegalize")

        def legalize(bb, call):
            if str(call.ty.dtype) != "float32":
                return default(bb, call)
            return fast(bb, call)

        return legalize

    def gelu(x: te.Tensor):
        half = tirx.const(0.5, "float32")
        return x * (half + topi.fast_erf(x * tirx.const(0.5**0.5, "float32")) * half)

    def sigmoid(x: te.Tensor):
        return te.compute(x.shape, lambda *i: fast_math.sigmoid(x(*i)), name="sigmoid")

    def silu(x: te.Tensor):
        return te.compute(x.shape, lambda *i: fast_math.silu(x(*i)), name="silu")

    return {
        "relax.nn.gelu": f32_only("relax.nn.gelu", lambda bb, c: bb.call_te(gelu, c.args[0], primfunc_name_hint="gelu")),
        "relax.nn.softmax": f32_only("relax.nn.softmax", lambda bb, c: bb.call_te(
            topi.nn.fast_softmax, c.args[0], int(c.attrs.axis), primfunc_name_hint="softmax")),
        "relax.exp": f32_only("relax.exp", lambda bb, c: bb.call_te(topi.fast_exp, c.args[0], primfunc_name_hint="exp")),
        "relax.erf": f32_only("relax.erf", lambda bb, c: bb.call_te(topi.fast_erf, c.args[0], primfunc_name_hint="erf")),
        "relax.sigmoid": f32_only("relax.sigmoid", lambda bb, c: bb.call_te(sigmoid, c.args[0],
                                                                              primfunc_name_hint="sigmoid")),
        "relax.nn.silu": f32_only("relax.nn.silu", lambda bb, c: bb.call_te(silu, c.args[0], primfunc_name_hint="silu")),
        "relax.tanh": f32_only("relax.tanh", lambda bb, c: bb.call_te(topi.fast_tanh, c.args[0],
                                                                        primfunc_name_hint="tanh")),
    }


def finish(mod: tvm.IRModule, target: tvm.target.Target, tir_pipeline: str = stack_alloc.PIPELINE, backend=None):
    """Schedule the leftovers of a fused module and compile it to a VM executable.

    ``backend``'s schedules for fused kernels (its blocked float convs) come
    first, the generic defaults take the rest. ``tir_pipeline`` names the TIR
    lowering (TVM's ``"default"`` only to measure what ``stack_alloc`` saves).
    """
    kernels = None if backend is None else (lambda sch: backend.schedule_fused(sch, target))
    mod = schedule_elementwise(mod, kernels, tile_registers(target, backend))
    lower = cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
    with target:
        return tvm.compile(mod, target=target, relax_pipeline=tvm.transform.Sequential(lower),
                           tir_pipeline=tir_pipeline)


def is_scheduled(func: tvm.tirx.PrimFunc) -> bool:
    """Whether a schedule was already applied (hago's kernels, MetaSchedule records)."""
    return bool((func.attrs or {}).get(IS_SCHEDULED, False))


def schedule_unscheduled(mod: tvm.IRModule, schedule) -> tvm.IRModule:
    """``mod`` with ``schedule(func)`` applied to each unscheduled PrimFunc (None from it: left alone)."""
    return map_prim_funcs(mod, lambda func: None if is_scheduled(func) else schedule(func))


def tile_registers(target: tvm.target.Target, backend=None) -> int | None:
    """The vector registers a matmul's register tile may fill (:func:`_register_tile`), where the target's
    own vectors are the ``VECTOR_BYTES`` ones the tile is made of (AVX-512); None elsewhere (the small
    ``TILE_ROWS`` x ``TILE_VECTORS`` tile: LLVM splits each 64-byte vector into 2-4 registers there)."""
    if backend is None or backend.vector_lanes(target) * 4 != VECTOR_BYTES:
        return None
    return backend.vector_registers(target)


def schedule_elementwise(mod: tvm.IRModule, kernels=None, registers: int | None = None) -> tvm.IRModule:
    """Default schedules for the unscheduled PrimFuncs of ``mod`` (see :func:`apply_default_schedule`).

    ``kernels(sch) -> bool``: a backend's schedules for the fused kernels it
    recognises, tried first on each function. ``registers``: :func:`tile_registers`.
    """
    return schedule_unscheduled(mod, lambda func: schedule_elementwise_func(func, kernels, registers))


def schedule_elementwise_func(func: tvm.tirx.PrimFunc, kernels=None,
                              registers: int | None = None) -> tvm.tirx.PrimFunc | None:
    """Default schedule of a fused PrimFunc; None when nothing could be scheduled."""
    from tvm.s_tir import Schedule

    try:
        sch = Schedule(tvm.IRModule({"main": func}))
    except Exception:  # not schedulable (already lowered)
        return None
    if kernels is not None:
        if schedule_kernel(sch, kernels):
            return sch.mod["main"].with_attr(IS_SCHEDULED, True)
        sch = Schedule(tvm.IRModule({"main": func}))  # a failed kernel schedule may have left it half done
    if not apply_default_schedule(sch, registers):
        return None
    return sch.mod["main"].with_attr(IS_SCHEDULED, True)


def schedule_kernel(sch, kernels) -> bool:
    """``kernels(sch)``; False (logged) when its schedule does not apply, so the generic default takes over."""
    from tvm.s_tir import ScheduleError

    try:
        return bool(kernels(sch))
    except (ScheduleError, tvm.error.InternalError, ValueError) as e:
        log.warning("default schedule of a fused kernel failed, the generic one applies: %s",
                    error_line(e, limit=None))
        return False


def apply_default_schedule(sch, registers: int | None = None) -> bool:
    """Schedule ``sch`` (one PrimFunc "main") in place; False when it could not be scheduled.

    Element-wise blocks are inlined into their consumers (the epilogue of a
    fused conv collapses into one loop nest) and run parallel and
    vectorized. A reduction block (an integer conv TVM lowered naively, such
    as a depthwise one) keeps its loop order but runs its outer spatial loops
    in parallel: a real schedule for it comes from tuning. Works on a traced
    schedule too, so the tuner can commit it as a record. ``registers``: :func:`tile_registers`.
    """
    from tvm.s_tir import ScheduleError

    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # no root block
        return False
    if not blocks:
        return False
    try:
        tiled = [b for b in blocks if _has_reduction(sch, b) and _tileable(sch, b)]
        keep = {sch.get(p).name_hint for b in tiled for p in sch.get_producers(b)}  # pads: no bounds test in the tile
        for blk in blocks[:-1]:
            if not _has_reduction(sch, blk) and sch.get(blk).name_hint not in keep:
                try:
                    sch.compute_inline(blk)
                except ScheduleError:  # e.g. read with a different index map: keeps its own loop
                    pass
        tiled_names = {sch.get(b).name_hint for b in tiled}
        for blk in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(blk).name_hint in tiled_names:
                _register_tile(sch, blk, registers)
            elif _has_reduction(sch, blk):
                if not (_row_reduce(sch, blk) or _lane_reduce(sch, blk)):
                    _parallel_spatial(sch, blk)
            else:
                _parallel_vectorize(sch, blk)
    except (ScheduleError, tvm.error.InternalError, TypeError) as e:  # TypeError: a symbolic extent
        why = error_line(e, limit=None)
        log.debug("default schedule failed, loops stay naive: %s", why)
        return False
    return True


def _tileable(sch, blk) -> bool:
    """Whether a reduction block can take ``_register_tile``: a product of two operands (a conv, a matmul),
    spatial loops first, then reductions, and
    along the innermost spatial loop every read either stays put or walks contiguously in its last
    dimension (a float conv of stride 1, a matmul), so the vectorized lanes are plain vector loads."""
    b = sch.get(blk)
    kinds = [int(iv.iter_type) for iv in b.iter_vars]
    spatial = kinds.count(0)
    if spatial < 2 or kinds[:spatial] != [0] * spatial or len(sch.get_loops(blk)) != len(kinds):
        return False
    if str(b.writes[0].source.dtype) not in ("float32", "int32"):
        return False
    if len({r.source.name for r in b.reads if r.source.name != b.writes[0].source.name}) < 2:
        return False  # one operand: a pool, which _lane_reduce runs with its padding inlined (no padded copy)
    v = b.iter_vars[spatial - 1].var
    if int(b.iter_vars[spatial - 1].dom.extent) % 4:
        return False
    walks = False
    for r in b.reads:
        region = [rg.min for rg in r.region]
        if any(_uses(e, v) for e in region[:-1]):
            return False
        if region and _uses(region[-1], v):
            coef = detect_linear_equation(region[-1], [v])
            if len(coef) != 2 or not isinstance(coef[0], tvm.tirx.IntImm) or int(coef[0]) != 1:
                return False
            walks = True
    return walks


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tvm.tirx.analysis.undefined_vars(expr))


def _register_tile(sch, blk, registers: int | None = None) -> None:
    """A register-blocked reduction: ``rows x vectors`` accumulators, reductions outside the tile.

    The two innermost spatial loops are split into a tile of up to ``TILE_ROWS``
    rows by ``TILE_VECTORS`` vectors of the innermost one (more vectors, up to
    ``TILE_ACCUMULATORS`` in all, when there are fewer rows); per reduction
    step each read is one vector load or one broadcast, reused across the
    tile. The accumulators live in a cache written back at the tile (LLVM
    keeps them in registers), the outer loops run in parallel.
    """
    loops = sch.get_loops(blk)
    spatial = sum(1 for iv in sch.get(blk).iter_vars if int(iv.iter_type) == 0)
    outer, (t, v), red = loops[:spatial - 2], loops[spatial - 2:spatial], loops[spatial:]
    bits = int(tvm.DataType(str(sch.get(blk).writes[0].source.dtype)).bits)
    ext_v, ext_t = int(sch.get(v).extent), int(sch.get(t).extent)
    lanes = next(n for n in (VECTOR_BYTES * 8 // bits, 8, 4) if ext_v % n == 0)
    rows = max(d for d in range(1, TILE_ROWS + 1) if ext_t % d == 0)
    # one row (a batch-1 dense) with one vector would be one FMA chain, its latency exposed at every step
    # (a 1280x1000 fp32 dense: 115 us); more vectors per row are independent chains, while enough tiles are
    # left to share among the threads
    divs = [d for d in range(1, max(TILE_VECTORS, TILE_ACCUMULATORS // rows) + 1) if (ext_v // lanes) % d == 0]
    outer_tiles = math.prod(int(sch.get(lp).extent) for lp in outer)
    tiles = outer_tiles * (ext_t // rows) * (ext_v // lanes)
    wide = [d for d in divs if d > TILE_VECTORS and tiles // d >= MIN_TILES]
    nvec = max(wide) if wide else max(d for d in divs if d <= TILE_VECTORS)
    if registers is not None and ext_t > 2:
        rows, nvec = _filled_tile(ext_t, ext_v // lanes, registers, outer_tiles, (rows, nvec))
    to, ti = sch.split(t, [None, rows])
    vo, vn, vl = sch.split(v, [None, nvec, lanes])
    # column panels outside rows: the panel of the constant operand (a matmul's weights) stays in L2
    sch.reorder(*outer, vo, to, *red, ti, vn, vl)
    wb = sch.cache_write(blk, 0, "global")
    sch.reverse_compute_at(wb, to)
    sch.parallel(sch.fuse(*outer, vo, to))
    sch.unroll(ti)
    sch.unroll(vn)
    sch.vectorize(vl)  # before the init is split off: vectorize needs the whole reduction block
    init = sch.decompose_reduction(blk, red[0])
    for b in (init, wb):
        bl = sch.get_loops(b)
        inner = bl[-1]
        if int(sch.get(inner).extent) % lanes == 0 and int(sch.get(inner).extent) > lanes:
            inner = sch.split(inner, [None, lanes])[-1]
        sch.vectorize(inner)


def divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def register_tile(columns: int, blocks: int, registers: int) -> tuple[int, int]:
    """``(rw, rc)`` dividing ``columns`` and ``blocks``, maximising FMAs per load within the register file.

    ``rw * rc`` accumulators plus ``rc`` weight vectors plus one broadcast
    must fit ``registers``; among equal ratios the bigger tile wins. The
    backends' float conv kernels tile their output columns x channel blocks
    with it, :func:`_register_tile` a matmul's rows x vectors.
    """
    best = (0.0, 0, 1, 1)
    for rc in divisors(blocks, MAX_BLOCKS):
        for rw in divisors(columns, max((registers - 1 - rc) // rc, 1)):
            best = max(best, (rw * rc / (rw + rc), rw * rc, rw, rc))
    return best[2], best[3]


def _filled_tile(rows: int, vectors: int, registers: int, outer: int, small: tuple[int, int]) -> tuple[int, int]:
    """``(rows, vectors)`` of a tile that fills the register file (:func:`register_tile`),
    where it leaves ``MIN_TILES`` tiles to share among the threads; ``small`` otherwise.

    ``TILE_ROWS`` x ``TILE_VECTORS`` is 8 of AVX-512's 32 registers: each step loads 2 vectors and
    broadcasts 4 values for 8 FMAs. Filling them (5 x 4 for ViT's 50 tokens, 7 x 3 for Swin's 49) ran
    ViT-B/32's and Swin's float dense layers 1.6-3.7x faster on session 19's EPYC.
    """
    r, v = register_tile(rows, vectors, registers)
    return (r, v) if r * v > small[0] * small[1] and outer * (rows // r) * (vectors // v) >= MIN_TILES else small


def _row_reduce(sch, blk) -> bool:
    """A reduction along the contiguous last dimension (softmax's max and sum, a row min/max) in vectors.

    The reduction loop is split into lane-wide steps and factored
    (``rfactor``): per row a vector of partial results accumulates with
    vector loads, and only the last step folds its lanes. Returns False
    (nothing changed) when the block is not such a reduction.
    """
    from tvm.s_tir import ScheduleError

    b = sch.get(blk)
    kinds = [int(iv.iter_type) for iv in b.iter_vars]
    loops = sch.get_loops(blk)
    if kinds.count(0) != len(kinds) - 1 or kinds[-1] == 0 or len(loops) != len(kinds) or len(loops) < 2:
        return False
    k = b.iter_vars[-1]
    bits = int(tvm.DataType(str(b.writes[0].source.dtype)).bits)
    lanes = next((n for n in (VECTOR_BYTES * 8 // bits, 8, 4) if int(k.dom.extent) % n == 0), None)
    if lanes is None or int(k.dom.extent) <= lanes:
        return False
    walks = False
    for r in b.reads:  # reads walk the last dimension with the reduction variable, or stay put (per row)
        region = [rg.min for rg in r.region]
        if any(_uses(e, k.var) for e in region[:-1]):
            return False
        walks = walks or bool(region and _uses(region[-1], k.var))
    if not walks:
        return False
    try:
        ko, ki = sch.split(loops[-1], [None, lanes])
        rf = sch.rfactor(ki, len(loops) - 1)
    except (ScheduleError, tvm.error.InternalError):
        return False
    rf_loops = sch.get_loops(rf)  # spatial..., ko, ki: the lanes stay innermost
    outer = rf_loops[:len(loops) - 1]
    sch.reverse_compute_at(blk, outer[-1])
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.vectorize(rf_loops[-1])
    return True


def _lane_reduce(sch, blk) -> bool:
    """A reduction whose innermost spatial loop walks the contiguous last dimension: vectors across it.

    A pool or a mean over H and W of a blocked ``NCHW{b}c`` tensor: the
    reductions move outside the ``b`` channel lanes, which become one vector
    of partial results per output pixel. False (nothing changed) for any
    other reduction.
    """
    b = sch.get(blk)
    kinds = [int(iv.iter_type) for iv in b.iter_vars]
    loops = sch.get_loops(blk)
    spatial = kinds.count(0)
    if spatial < 2 or kinds[:spatial] != [0] * spatial or len(loops) != len(kinds) or spatial == len(kinds):
        return False
    lane = b.iter_vars[spatial - 1]
    extent = int(lane.dom.extent)
    if extent % 4 or extent > 64:
        return False
    for r in [*b.reads, *b.writes]:
        region = [rg.min for rg in r.region]
        if any(_uses(e, lane.var) for e in region[:-1]) or not region:
            return False
        if _uses(region[-1], lane.var):
            coef = detect_linear_equation(region[-1], [lane.var])
            if len(coef) != 2 or not isinstance(coef[0], tvm.tirx.IntImm) or int(coef[0]) != 1:
                return False
    outer, inner, red = loops[:spatial - 1], loops[spatial - 1], loops[spatial:]
    sch.reorder(*outer, *red, inner)
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.vectorize(inner)
    init = sch.decompose_reduction(blk, red[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return True


def _parallel_spatial(sch, blk) -> None:
    """Run the leading data-parallel loops of a naive reduction block in parallel."""
    spatial = sum(1 for iv in sch.get(blk).iter_vars if int(iv.iter_type) == 0)
    loops = sch.get_loops(blk)[:max(spatial - 1, 1)]  # the innermost spatial loop stays serial
    if loops and spatial:
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


def _has_reduction(sch, blk) -> bool:
    return any(int(iv.iter_type) != 0 for iv in sch.get(blk).iter_vars)  # 0: data-parallel


def _parallel_vectorize(sch, blk) -> None:
    """Vectorize the innermost loop (when the lanes divide it), run the outer loops in parallel.

    Loops are not flattened into one: a flat index needs a div/mod per
    element to address a 4-d tensor, which costs more than the arithmetic.
    """
    loops = sch.get_loops(blk)
    if not loops:
        return
    extents = [int(sch.get(lp).extent) for lp in loops]
    bits = max(int(tvm.DataType(str(w.source.dtype)).bits) for w in sch.get(blk).writes)
    inner = loops[-1]
    lanes = next((v for v in (VECTOR_BYTES * 8 // bits, 16, 8, 4) if extents[-1] % v == 0 and v <= extents[-1]), 1)
    if lanes > 1:
        inner_o, inner_i = sch.split(inner, [None, lanes])
        sch.vectorize(inner_i)
        outer = [*loops[:-1], inner_o]
    else:
        outer = loops[:-1] if len(loops) > 1 else loops
    total = 1
    for e in extents:
        total *= e
    if total >= MIN_PARALLEL and outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
