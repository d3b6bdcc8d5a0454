"""Integer depthwise conv2d for AVX-512: NCHW, vectorized along the output width.

A depthwise conv does ``KH*KW`` multiply-adds per output: far too little
work for VNNI (each 1-channel group would pad to 16x4) or to pay for NCHW <->
NCHW16c conversions around it. This kernel keeps the plain op's NCHW layout
and contract: uint8 input, int8 weights ``[O, 1, KH, KW]`` (``O`` a multiple of
``C``: channel multipliers are allowed), int32 output bit-identical to
``conv2d(pad(x, zero point), w, strides, dilation, groups=C, out_dtype="int32")``,
or, given a ``Requant``, that accumulator requantized to 8 bits in the
write-back (realize's fixed-point formula, see ``epilogue``).

One PrimFunc (``hago_conv2d_depthwise``), stages in order:

* ``hago_dw_pad``: the zero-point padding, done in the kernel (a Relax
  ``pad`` fused into the producer's epilogue runs scalar: the vectorizer
  gives up on its bounds test); ``decompose_padding`` splits it into a fill
  and a condition-free copy, both vectorized. It also adds the columns the
  last whole output vector reads;
* ``hago_dw_phase`` (stride 2 only): every padded row split into its even
  and odd columns (``x[.., 2j + p] -> xs[.., p, j]``), tensorized as one
  32-byte load and two byte shuffles (``vpsrlw`` + ``vpmovwb``) so the taps
  read contiguous vectors. Larger strides use the same split as a gather;
* the conv (``hago.kernel: conv2d_depthwise``): every thread owns a tile of
  output rows x 16-column vectors held in int32 zmm accumulators; per tap it
  broadcasts one weight and multiply-adds the zero-extended input segments
  (``vpmovzxbd`` loads; LLVM makes the 8-bit-range multiply-add ``vpdpwssd``);
* the write-back of the tile, or ``hago_requant`` computed on it. The output
  width is computed in whole vectors (``owp`` columns); without a requant a
  ``strided_slice`` (which fuses into the epilogue that follows) drops the
  extra columns.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
from tvm import relax, te, tirx
from tvm.relax import op as O

from hago.errors import QuantizeError
from .epilogue import EPILOGUE, Requant, requant_te
from .vnni import KERNEL_ATTR, _int8, _pair, _u8_shape

DEPTHWISE = "conv2d_depthwise"
PHASE = "hago_dw_phase"
PAD = "hago_dw_pad"
DEINTERLEAVE_INTRIN = "hago_deinterleave2_u8x32"
ZMM_I32 = 16  # int32 lanes of one zmm register
MAX_ACC = 16  # zmm accumulators per tile; the rest hold input segments and the weight broadcast


def depthwise_applicable(x_shape, w_shape, groups: int) -> bool:
    """Whether ``emit_conv2d_depthwise`` handles this conv (static NCHW/OIHW shapes, ``groups == C > 1``)."""
    try:
        xs, ws = [int(s) for s in x_shape], [int(s) for s in w_shape]
    except (TypeError, ValueError):
        return False
    if len(xs) != 4 or len(ws) != 4:
        return False
    c, o = xs[1], ws[0]
    return int(groups) == c > 1 and ws[1] == 1 and o % c == 0


def _out_size(h: int, k: int, s: int, d: int) -> int:
    return (h - (k - 1) * d - 1) // s + 1


def vector_lanes(ow: int) -> int:
    """int32 lanes of an output-width vector: one zmm (16), or a ymm/xmm for narrow maps."""
    return 16 if ow > 8 else 8 if ow > 4 else 4


# ---- TE kernel ------------------------------------------------------------------
def _pad_te(x, padding, pad_value):
    """uint8 ``x`` padded by ``(top, left, bottom, right)`` with ``pad_value`` (in the kernel, not a Relax op)."""
    n, c, h, w = (int(s) for s in x.shape)
    top, left, bottom, right = padding

    def body(i, cc, y, z):
        inside = tirx.all(y >= top, y < top + h, z >= left, z < left + w)
        return tirx.if_then_else(inside, x[i, cc, y - top, z - left], tirx.const(pad_value, x.dtype))

    return te.compute((n, c, h + top + bottom, w + left + right), body, name=PAD)


def _phase_te(x, sw):
    """uint8 ``x[n, c, h, w] -> xs[n, c, h, p, j] = x[n, c, h, j*sw + p]`` (``w`` a multiple of ``sw``)."""
    n, c, h, w = (int(s) for s in x.shape)
    return te.compute((n, c, h, sw, w // sw), lambda i, cc, y, p, j: x[i, cc, y, j * sw + p], name=PHASE)


def _depthwise_te(x, w, strides, dilation, owp, padding, pad_value):
    """int32 ``[n, o, oh, owp]``; ``padding`` gives ``x`` the columns the ``owp`` computed outputs read."""
    if any(padding):
        x = _pad_te(x, padding, pad_value)
    n, c, h, _ = (int(s) for s in x.shape)
    o, kh_, kw_ = (int(s) for s in w.shape)
    (sh, sw), (dh, dw) = strides, dilation
    oh = _out_size(h, kh_, sh, dh)
    mult = o // c
    kh = te.reduce_axis((0, kh_), name="kh")
    kw = te.reduce_axis((0, kw_), name="kw")

    def ch(oc):
        return oc if mult == 1 else oc // mult

    if sw == 1:
        def load(i, oc, y, z):
            return x[i, ch(oc), y * sh + kh * dh, z + kw * dw]
    else:
        xs = _phase_te(x, sw)

        def load(i, oc, y, z):  # column z*sw + kw*dw is phase (kw*dw) % sw, index z + (kw*dw) // sw
            return xs[i, ch(oc), y * sh + kh * dh, (kw * dw) % sw, z + (kw * dw) // sw]

    return te.compute(
        (n, o, oh, owp),
        lambda i, oc, y, z: te.sum(load(i, oc, y, z).astype("int32") * w[oc, kh, kw].astype("int32"), axis=[kh, kw]),
        name=DEPTHWISE,
        attrs={KERNEL_ATTR: DEPTHWISE},
    )


def _kernel_te(x, w, *consts, strides, dilation, owp, padding, pad_value, rq, ow):
    acc = _depthwise_te(x, w, strides, dilation, owp, padding, pad_value)
    if rq is None:
        return acc
    n, o, oh, _ = (int(s) for s in acc.shape)
    return requant_te(acc, *consts, rq, (n, o, oh, ow), lambda i, c, y, z: (i, c, y, z))


def emit_conv2d_depthwise(bb: relax.BlockBuilder, x_u8_nchw: relax.Expr, w_oihw_int8: np.ndarray,
                          strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), pad_value: int = 0,
                          groups: int | None = None, requant: Requant | None = None) -> relax.Expr:
    """NCHW depthwise conv of uint8 ``x`` with int8 numpy ``w [O, 1, KH, KW]``.

    ``padding`` is ``(top, left, bottom, right)``, filled with ``pad_value``
    (the input zero point). Without ``requant``: int32, bit-identical to
    ``conv2d(pad(x, padding, pad_value), w, strides, padding=0, dilation,
    groups=C, out_dtype="int32")``; with it, that accumulator requantized to
    ``requant.dtype`` in the kernel's write-back (see ``epilogue``).
    Check ``depthwise_applicable`` first.
    """
    xs = _u8_shape(bb, x_u8_nchw, "depthwise conv2d")
    w = _int8(w_oihw_int8, "depthwise conv2d")
    groups = xs[1] if groups is None else int(groups)
    if not depthwise_applicable(xs, w.shape, groups):
        raise QuantizeError(f"conv2d {xs} x {list(w.shape)} groups={groups} is not depthwise; "
                            "check depthwise_applicable first")
    (sh, sw), (dh, dw) = _pair(strides), _pair(dilation)
    top, left, bottom, right = (int(p) for p in padding)
    kh, kw = int(w.shape[2]), int(w.shape[3])
    oh = _out_size(xs[2] + top + bottom, kh, sh, dh)
    ow = _out_size(xs[3] + left + right, kw, sw, dw)
    if oh < 1 or ow < 1:
        raise QuantizeError(f"depthwise conv2d {xs} x {list(w.shape)}: the kernel is larger than the padded input")
    lanes = vector_lanes(ow)
    owp = -(-ow // lanes) * lanes
    width = max(xs[3] + left + right, (owp - 1) * sw + (kw - 1) * dw + 1)  # columns the last vector reads
    if sw > 1:  # the phase split copies whole vectors of sw * 16 input columns
        width = -(-width // (sw * ZMM_I32)) * sw * ZMM_I32
    right = width - xs[3] - left
    pad_value = int(pad_value)
    if not 0 <= pad_value <= 255:
        raise QuantizeError(f"depthwise conv2d: pad value {pad_value} is not a uint8")
    wc = relax.const(np.ascontiguousarray(w[:, 0]), "int8")
    consts = [] if requant is None else requant.constants(int(w.shape[0]))
    kernel = functools.partial(_kernel_te, strides=(sh, sw), dilation=(dh, dw), owp=owp, ow=ow,
                               padding=(top, left, bottom, right), pad_value=pad_value, rq=requant)
    acc = bb.emit_te(kernel, x_u8_nchw, wc, *consts, primfunc_name_hint="hago_conv2d_depthwise")
    if owp != ow and requant is None:
        acc = bb.emit(O.strided_slice(acc, axes=[3], begin=[0], end=[ow]))
    return acc


# ---- the stride-2 column split as a tensor intrinsic --------------------------------
_lock = threading.Lock()
_registered = False


def deinterleave_intrin() -> str:
    """Register (once) and return the intrinsic splitting 32 bytes into even and odd halves."""
    global _registered
    with _lock:
        if not _registered:
            from tvm.s_tir import TensorIntrin
            from tvm.script import tirx as T

            even = [2 * k for k in range(16)]
            odd = [2 * k + 1 for k in range(16)]

            @T.prim_func(s_tir=True)
            def desc(a: T.handle, b: T.handle) -> None:
                s0 = T.int64()
                A = T.match_buffer(a, (T.int64(32),), "uint8", offset_factor=1)
                B = T.match_buffer(b, (T.int64(2), T.int64(16)), "uint8", strides=[s0, T.int64(1)], offset_factor=1)
                with T.sblock("root"):
                    T.reads(A[0:32])
                    T.writes(B[0:2, 0:16])
                    for p, j in T.grid(T.int64(2), T.int64(16)):
                        with T.sblock("update"):
                            vp, vj = T.axis.remap("SS", [p, j])
                            B[vp, vj] = A[vj * T.int64(2) + vp]

            @T.prim_func(s_tir=True)
            def impl(a: T.handle, b: T.handle) -> None:
                s0 = T.int64()
                A = T.match_buffer(a, (T.int64(32),), "uint8", offset_factor=1)
                B = T.match_buffer(b, (T.int64(2), T.int64(16)), "uint8", strides=[s0, T.int64(1)], offset_factor=1)
                with T.sblock("root"):
                    T.reads(A[0:32])
                    T.writes(B[0:2, 0:16])
                    B[0, T.ramp(T.int64(0), 1, 16)] = T.Shuffle([A.vload([T.int64(0)], "uint8x32")], even)
                    B[1, T.ramp(T.int64(0), 1, 16)] = T.Shuffle([A.vload([T.int64(0)], "uint8x32")], odd)

            TensorIntrin.register(DEINTERLEAVE_INTRIN, desc, impl, override=True)
            _registered = True
    return DEINTERLEAVE_INTRIN


# ---- default schedule ---------------------------------------------------------
def depthwise_tile(oh: int, chunks: int, whole_rows: bool = False) -> tuple[int, int]:
    """``(rows, vectors)`` of the register tile: divisors of ``oh`` / ``chunks``, at most ``MAX_ACC``.

    Most accumulators first, then the widest; ``whole_rows`` asks for all
    ``chunks`` vectors of a row in one tile (where they fit).
    """
    best = (0, 0, 1, 1)
    if whole_rows and chunks <= MAX_ACC:
        return max(d for d in range(1, min(oh, MAX_ACC // chunks) + 1) if oh % d == 0), chunks
    for ct in (d for d in range(1, min(chunks, MAX_ACC) + 1) if chunks % d == 0):
        for rt in (d for d in range(1, min(oh, MAX_ACC // ct) + 1) if oh % d == 0):
            best = max(best, (rt * ct, ct, rt, ct))
    return best[2], best[3]


def schedule_depthwise(sch, blk) -> None:
    """Rows x vectors tile of int32 accumulators per thread, taps outside it, width vectorized."""
    n, oc, y, z, rh, rw = sch.get_loops(blk)
    ext = lambda lp: int(sch.get(lp).extent)  # noqa: E731
    lanes = min(ZMM_I32, ext(z))  # the emitter makes the width whole vectors
    epilogue = [c for c in sch.get_consumers(blk) if sch.get(c).name_hint == EPILOGUE]
    ow = ext(sch.get_loops(epilogue[0])[-1]) if epilogue else ext(z)
    # a requantizing write-back over a ragged tile would need a predicate: keep whole rows then
    rt, ct = depthwise_tile(ext(y), ext(z) // lanes, whole_rows=ow != ext(z))
    yo, yi = sch.split(y, [None, rt])
    zo, zc, zv = sch.split(z, [None, ct, lanes])
    sch.reorder(n, oc, yo, zo, rh, rw, yi, zc, zv)
    acc = epilogue[0] if epilogue else sch.cache_write(blk, 0, "global")
    sch.reverse_compute_at(acc, zo)
    sch.parallel(sch.fuse(n, oc, yo, zo))
    sch.unroll(yi)
    sch.unroll(zc)
    sch.vectorize(zv)  # before the init is split off: vectorize needs the complete reduction block
    init = sch.decompose_reduction(blk, rh)
    # zero-init and write-back: rows unrolled, width vectorized (a requantize is too long to unroll)
    for b, unroll in ((init, True), (acc, not epilogue)):
        loops = sch.get_loops(b)[1:]
        for lp in loops[:-1]:
            if unroll and ext(lp) > 1:
                sch.unroll(lp)
        sch.vectorize(loops[-1])
    for prod in sch.get_producers(blk):
        if sch.get(prod).name_hint == PHASE:
            for pp in sch.get_producers(prod):
                _schedule_pad(sch, pp)
            _schedule_phase(sch, prod)
        elif sch.get(prod).name_hint == PAD:
            _schedule_pad(sch, prod)


def _schedule_pad(sch, blk) -> None:
    """The zero-point pad: per (n, c) plane, fill with the pad value, then copy the rows in (both vectorized)."""
    n, c, _, _ = sch.get_loops(blk)
    plane = sch.fuse(n, c)
    fill = sch.decompose_padding(blk, sch.get_loops(blk)[1])
    sch.parallel(plane)
    for b in (fill, blk):
        sch.vectorize(sch.get_loops(b)[-1])


def _schedule_phase(sch, blk) -> None:
    """The column split: parallel over rows; 16 output bytes per phase per step."""
    n, c, h, p, j = sch.get_loops(blk)
    sch.parallel(sch.fuse(n, c, h))
    jo, ji = sch.split(j, [None, ZMM_I32])  # the emitter pads the row to whole steps
    sch.reorder(jo, p, ji)
    if int(sch.get(p).extent) == 2:
        sch.tensorize(p, deinterleave_intrin())
    else:
        sch.unroll(p)
        sch.vectorize(ji)
