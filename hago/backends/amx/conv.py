"""AMX bf16 conv2d (``tdpbf16ps``) as implicit GEMM, for hago's blocked float layouts.

The conv arrives as ``relax.nn.conv2d`` in the layouts :mod:`hago.backends.cpu.float_layout`
chooses: data ``NCHW{ib}c`` (bf16, or fp32), a constant weight
``OIHW{ib}i{ob}o`` and an fp32 ``NCHW{ob}c`` result (``ib`` in 4..32, ``ob``
in 4, 8, 16). :func:`legalize_conv2d_amx_bf16` replaces it with the kernel
and, where needed, a packing pass:

* **K steps.** GEMM rows are output pixels, columns output channels, K the
  (input-channel block, kh, kw) steps of ``kb`` channels: one input pixel's
  ``kb`` channels are one A tile row (``conv_ir``). A bf16 input without
  padding in 16- or 32-channel blocks is read as it is (``kb = ib``,
  :func:`k_block`; 16 channels fill half a tile row, still cheaper than a
  pass over the activation). Anything else is first packed (TE, scheduled
  here) into bf16 ``[N, C/32, Hp, Wp, 32]``: spatially zero-padded,
  channels re-blocked to 32 (zero beyond C), fp32 rounded to bf16 (nearest
  even) on the way.
* **Pixel tiles** of ``rows`` (<= 16) GEMM rows; the A tile of tap ``(kh,
  kw)`` starts ``kh`` padded rows and ``kw`` pixels from the tile's first
  input pixel, so no im2col copy exists. Two ways to lay tiles
  (:attr:`ConvGeometry.mode`): ``rows``, within one output row (A row stride
  ``stride_w`` pixels; 56 -> 4 x 14, 112 -> 7 x 16), or ``image``, for
  stride 1, across the padded image (the columns between output rows are
  computed and dropped), which needs 4 tiles instead of 7 for a 3x3 conv on
  7 x 7 and is a plain GEMM for a 1x1 conv without padding. A tile that
  would run past the end overlaps its neighbour instead (computed and stored
  twice, equal values), so every tile is full.
* **The kernel** (hand-written TIR, as :mod:`.dense`): each micro-kernel call
  holds 2 x 2 C tiles (two pixel tiles by 32 output channels, ``rows x 16``
  fp32 each) for the whole K loop. With ``ob == 16`` and consecutive pixels
  the tiles store straight into ``NCHW16c`` (one C row = one output pixel's
  16 channels, 64 bytes; the two column tiles ``OH*OW*64`` bytes apart);
  otherwise (``ob`` 8 or 4: a layer of 24 or 40 channels, or ``image`` tiles
  with dropped columns) through a 4 KiB stack buffer and a vectorized copy.
  An odd count of pixel tiles or channel blocks ends with a 1-tile call.
  The parallel tasks (``dense.task_grid``, one per thread) split (image,
  pixel-tile pair) x (32-channel group); each configures the tiles once,
  runs its blocks in the order that reads fewer bytes
  (:func:`weights_outer_order`) and releases the tiles. The kernel asks
  Linux for AMX itself (``amx_ir.REQUEST_FN``), as the dense kernels do.

The weight is re-packed at compile time (numpy, ``ml_dtypes.bfloat16``,
nearest even) into ``[O16, C/kb, KH, KW, kb/2, 16, 2]``: per 16-channel
output block, one B tile per K step, in the micro-kernel's loop order. An
optional fp32 bias starts the C tiles (a row-stride-0 tile load), so it costs
no pass; when the kernel has an epilogue (a clamp, a cast, a residual) the
epilogue adds it instead, first, so the fused sums are the unfused program's
bit for bit.

Numerics: bf16 products are exact in fp32; the tile unit sums in fp32, so the
result differs from an fp32 sum of the rounded inputs only in the order and
rounding of the additions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.script import tirx as T

from hago import tvmscript  # noqa: F401  (T.macro calls without reading source files)
from hago.errors import QuantizeError
from hago.tvm_consts import IS_SCHEDULED, KERNEL_ATTR, OPAQUE

from ..cpu.bf16_epilogue import fp32_source as _fp32_source
from ..cpu.float_kernels import blocked_weight_to_oihw  # noqa: F401  (re-exported: this module's callers)
from ..x86.epilogue import requant_expr
from .amx_ir import IMPORT_PRAGMA, RELEASE_FN, REQUEST_FN
from .conv_ir import (ELEMENT, K_BLOCKS, K_CHANNELS, b_step_bytes, conv_config_fn, conv_ir, conv_kernel_name,
                      pixel_bytes)
from .dense import BF16, LANES, PERMISSION_MESSAGE, default_threads, task_grid

CONV_AMX = "conv2d_amx_bf16"
CONV_AMX_INT8 = "conv2d_amx_int8"
PACK_DATA = "pack_amx_conv_data"
IN_BLOCKS = (4, 8, 16, 32)  # input channel blocks of the relax layout (bytes per pixel row: 8 .. 64)
OUT_BLOCKS = (4, 8, 16)  # output channel blocks (16: tiles store into the output directly)
MAX_ROWS = 16  # rows of a tile


def _up(v: int, m: int) -> int:
    return -(-v // m) * m


def pixel_tiles(length: int) -> tuple[int, int]:
    """``(rows, tiles)`` covering ``length`` GEMM rows: the fewest tiles, then the fewest rows each.

    A tile costs about the same whatever its rows (a ``tdpbf16ps`` of 7 rows
    took 0.53x the time per MAC of one of 16), so the count of tiles is what
    to minimise. Tile ``j`` starts at ``min(j * rows, length - rows)``: a
    last tile that would run past the end overlaps its neighbour instead.
    """
    tiles = -(-length // MAX_ROWS)
    return -(-length // tiles), tiles


#: cost of a tile whose rows go through the stack buffer, relative to one stored straight into the output
BUFFERED_TILE_COST = 1.25


@dataclass(frozen=True)
class ConvGeometry:
    """One conv: batch, channels, sizes, kernel, strides, padding ``(top, left, bottom, right)``, blocks.

    ``kb``: input channels per K step (:func:`k_block`; None: 32, the packed input).
    ``force_mode``: ``"rows"`` or ``"image"`` instead of :attr:`mode`'s choice (tests, measurements).
    """

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    ib: int
    ob: int
    kb: int | None = None
    force_mode: str | None = None
    dtype: str = "bf16"  # "bf16" (tdpbf16ps, fp32 out) or "int8" (tdpbusd, requantized uint8/int8 NCHW16c out)
    #: channels of a pixel-packed input ``[N, 1, Hp, Wp + slack, C]`` (a narrow stem, NCHW{C}c padded: an A
    #: row of ``kb`` bytes then covers ``kb / C`` neighbouring pixels, the kernel columns folded into K;
    #: ``slack`` pixels end each row so the last A row stays inside it); None: ``[N, C/kb, Hp, Wp, kb]``
    pitch: int | None = None

    @property
    def k_block(self) -> int:
        return self.kb or K_CHANNELS[self.dtype]

    @property
    def cb(self) -> int:  # K blocks of the input channels
        return -(-self.c // self.k_block)

    @property
    def pixel(self) -> int:  # bytes from one input pixel to the next (an A row's start)
        return pixel_bytes(self.pitch or self.k_block, self.dtype)

    @property
    def row_pixels(self) -> int:
        """Pixels of one input row: ``Wp``, plus the slack of a pixel-packed input (see ``pitch``)."""
        return self.wp + (-(-self.k_block // self.pitch) if self.pitch else 0)

    @property
    def row_bytes(self) -> int:
        return self.row_pixels * self.pixel

    @property
    def hp(self) -> int:
        return self.h + self.padding[0] + self.padding[2]

    @property
    def wp(self) -> int:
        return self.w + self.padding[1] + self.padding[3]

    @property
    def oh(self) -> int:
        return (self.hp - self.kh) // self.strides[0] + 1

    @property
    def ow(self) -> int:
        return (self.wp - self.kw) // self.strides[1] + 1

    @property
    def image_line(self) -> int:
        """Padded-image pixels from the first output pixel's to the last's (``image`` mode's GEMM rows)."""
        return (self.oh - 1) * self.wp + self.ow

    @property
    def mode(self) -> str:
        """How pixel tiles run: ``"rows"``, within one output row, or ``"image"``, across the padded image.

        ``image`` (stride 1 only): output pixel ``(y, x)`` is GEMM row ``y *
        Wp + x``, whose tap ``(kh, kw)`` is input pixel ``row + kh*Wp + kw``,
        so a tile may cross output rows; the ``Wp - OW`` rows between two
        output rows are computed and dropped (unless ``Wp == OW``: a 1x1 conv
        without padding is then a plain GEMM over the image). A tile costs the
        same whatever its rows (measured: 7-row tiles ran at 53% of the
        16-row rate), so this wins where output rows are short: a 3x3 conv
        on 7 x 7 pixels needs 4 tiles instead of 7.
        """
        if self.force_mode:
            return self.force_mode
        if self.strides != (1, 1) or self.pitch:
            return "rows"
        if self.wp == self.ow:
            return "image"
        rows_tiles = self.oh * pixel_tiles(self.ow)[1]
        return "image" if pixel_tiles(self.image_line)[1] * BUFFERED_TILE_COST < rows_tiles else "rows"

    @property
    def line(self) -> int:
        """GEMM rows of one line of tiles: the image (``image`` mode) or an output row."""
        return self.image_line if self.mode == "image" else self.ow

    @property
    def lines(self) -> int:
        return 1 if self.mode == "image" else self.oh

    @property
    def consecutive(self) -> bool:
        """Whether a tile's rows are consecutive output pixels (``rows`` mode, or ``image`` with ``Wp == OW``)."""
        return self.mode == "rows" or self.wp == self.ow

    @property
    def direct(self) -> bool:
        """Whether C tiles store straight into the output (bf16 ``NCHW16c``, consecutive pixels; int8 requantizes)."""
        return self.dtype == "bf16" and self.ob == LANES and self.consecutive

    @property
    def o16(self) -> int:  # 16-channel output blocks (weight column blocks)
        return -(-self.o // LANES)

    def tiling(self) -> tuple[int, int]:
        """``(rows, tiles per line)``."""
        return pixel_tiles(self.line)

    def macs(self) -> int:
        return self.n * self.o * self.oh * self.ow * self.c * self.kh * self.kw


def conv2d_amx_bf16_applicable(data_shape, weight_shape, strides, padding, dilation, groups) -> bool:
    """Whether the AMX bf16 conv takes this conv in the blocked layouts (shapes of the 5-D data, 6-D weight).

    Needs static shapes, one group, dilation 1, ``ib`` in 4..32 (so not an
    RGB first layer), ``ob`` in 4, 8, 16 and a kernel that fits the padded input.
    """
    try:
        ds, ws = [int(s) for s in data_shape], [int(s) for s in weight_shape]
        strides, dilation, padding = [int(s) for s in strides], [int(s) for s in dilation], [int(p) for p in padding]
    except (TypeError, ValueError):
        return False
    if len(ds) != 5 or len(ws) != 6 or int(groups) != 1 or any(d != 1 for d in dilation):
        return False
    if len(padding) == 2:
        padding = padding * 2
    if len(padding) != 4 or len(strides) != 2 or min(strides) < 1 or min(padding) < 0:
        return False
    _, cblocks, h, w, ib = ds
    _, wcblocks, kh, kw, wib, ob = ws
    if ib not in IN_BLOCKS or ob not in OUT_BLOCKS or (wcblocks, wib) != (cblocks, ib):
        return False
    return h + padding[0] + padding[2] >= kh and w + padding[1] + padding[3] >= kw and min(ds + ws) >= 1


def geometry(data_shape, weight_shape, strides, padding) -> ConvGeometry:
    n, cblocks, h, w, ib = (int(s) for s in data_shape)
    oblocks, _, kh, kw, _, ob = (int(s) for s in weight_shape)
    padding = tuple(int(p) for p in padding)
    padding = padding * 2 if len(padding) == 2 else padding
    return ConvGeometry(n, cblocks * ib, h, w, oblocks * ob, kh, kw, tuple(int(s) for s in strides), padding, ib, ob)


# ---- operands -------------------------------------------------------------------------
def pack_conv_weight(w_oihw: np.ndarray, kb: int = K_CHANNELS["bf16"], dtype: str = "bf16") -> np.ndarray:
    """``[O, C, KH, KW]`` -> ``[O16, C/kb, KH, KW, kb/v, 16, v]`` (zero-padded): bf16 (``v = 2``), int8 (``v = 4``).

    Element ``[ob, cb, kh, kw, p, j, e]`` is the weight of output channel
    ``16*ob + j`` and input channel ``kb*cb + v*p + e``: B tile rows are
    groups of ``v`` input channels, each row the 16 output channels' groups.
    bf16 rounds to nearest even; int8 weights must already be int8.
    """
    o, c, kh, kw = w_oihw.shape
    v = ELEMENT[dtype][1]
    np_dtype = ml_dtypes.bfloat16 if dtype == "bf16" else np.int8
    if dtype == "int8" and np.asarray(w_oihw).dtype != np.int8:
        raise QuantizeError(f"AMX int8 conv: weights must be int8, got {np.asarray(w_oihw).dtype}")
    op, cp = _up(o, LANES), _up(c, kb)
    w = np.zeros((op, cp, kh, kw), np_dtype)
    w[:o, :c] = np.asarray(w_oihw).astype(np_dtype)
    w = w.reshape(op // LANES, LANES, cp // kb, kb // v, v, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 2, 5, 6, 3, 1, 4))


def _pack_data_te(x, g: ConvGeometry, pad_value: int = 0):
    """``[N, C/ib, H, W, ib]`` -> ``[N, C/kb, Hp, Wp, kb]``: ``pad_value`` outside the image and beyond C.

    bf16 (fp32 input rounded on the way; pads with zero) or uint8 (int8 kernel;
    pads with the zero point, so the padding is real value 0).
    """
    top, left, kb = g.padding[0], g.padding[1], g.k_block
    per = kb // g.ib  # relax blocks per K block
    if g.dtype == "int8":
        zero = tirx.const(int(pad_value), "uint8")
    else:
        zero = tirx.reinterpret(BF16, tirx.const(0, "uint16"))  # a bf16 literal would be a bf16 broadcast
    cblocks = g.c // g.ib

    def body(n, cb, y, x_, l):
        blk = cb * per + l // g.ib
        conds = []
        if g.c % kb:
            conds.append(blk < cblocks)
            blk = tirx.min(blk, cblocks - 1)  # padded lanes read clamped indices: a vector loads every lane
        yy, xx = y - top, x_ - left
        if top or g.padding[2]:
            conds += [yy >= 0, yy < g.h]
            yy = tirx.max(tirx.min(yy, g.h - 1), 0)
        if left or g.padding[3]:
            conds += [xx >= 0, xx < g.w]
            xx = tirx.max(tirx.min(xx, g.w - 1), 0)
        v = x[n, blk, yy, xx, l % g.ib]
        v = v if g.dtype == "int8" or str(v.dtype) == BF16 else v.astype(BF16)
        return tirx.if_then_else(tirx.all(*conds), v, zero) if conds else v

    shape = (g.n, g.cb, g.hp, g.wp, kb)
    return te.compute(shape, body, name=PACK_DATA, attrs={KERNEL_ATTR: PACK_DATA})


def pack_data_func(g: ConvGeometry, in_dtype: str, pad_value: int = 0) -> tirx.PrimFunc:
    """The scheduled pack PrimFunc: (image, block, row) in parallel, the channels of one relax block a vector."""
    from tvm.s_tir import Schedule

    x = te.placeholder((g.n, g.c // g.ib, g.h, g.w, g.ib), in_dtype, name="x")
    out = _pack_data_te(x, g, pad_value)
    sch = Schedule(tvm.IRModule({"main": te.create_prim_func([x, out])}))
    blk = sch.get_sblock(PACK_DATA)
    n, cb, y, x_, l = sch.get_loops(blk)
    sch.parallel(sch.fuse(n, cb, y))
    if g.ib < g.k_block:
        l = sch.split(l, [None, g.ib])[-1]
    sch.vectorize(l)
    func = sch.mod["main"].with_attr(IS_SCHEDULED, True).with_attr("op_pattern", OPAQUE)
    return func.without_attr("global_symbol")


def k_block(g: ConvGeometry, in_dtype: str) -> int:
    """Input channels per K step: the relax block itself (no packing pass) where the kernel can read the input.

    That needs bf16 input without padding in blocks of 16 or 32. A 16-block
    does half the work per ``tdpbf16ps``, yet beats a packing pass over the
    activation, which runs at memory speed (one thread, bf16 NCHW16c input:
    1x1 144->24 at 56 x 56 32 us direct, 72 us packed; 576->96 at 14 x 14
    24 / 26 us; 96->576 at 14 x 14 21 / 20 us).
    """
    if g.dtype == "int8":
        return int8_k_block(g)
    if in_dtype == BF16 and not any(g.padding) and g.ib in K_BLOCKS["bf16"]:
        return g.ib
    return K_CHANNELS["bf16"]


def int8_k_block(g: ConvGeometry) -> int:
    """Input channels per K step of the int8 conv: the 16-channel blocks as they are, or a packed copy.

    Reading ``NCHW16c`` in place fills a quarter of each tile row; packing to
    64 (or 32) channels is one pass over the uint8 activation. A padded conv
    needs a pass anyway (the padding is written), so it packs to full rows;
    an unpadded one (1x1) reads in place, which measured faster on all but
    one of 25 pointwise convs of MobileNetV2 and EfficientNet-Lite0
    (``benchmarks/amx_vs_vnni.py``: 480->112 at 14 x 14 14.7 us in place,
    26.1 us packed; the exception, 320->1280 at 7 x 7, 27.0 vs 21.7 us).
    """
    if any(g.padding):
        return 64 if g.c > 32 else 32
    return g.ib


def needs_pack(g: ConvGeometry, in_dtype: str) -> bool:
    """Whether the kernel's input is a packed copy (padded, full blocks) rather than ``x`` itself."""
    wanted = "uint8" if g.dtype == "int8" else BF16
    return in_dtype != wanted or g.ib != g.k_block or any(g.padding)


# ---- the kernel -----------------------------------------------------------------------
def weights_outer_order(g: ConvGeometry, cm: int, cn: int) -> bool:
    """Whether a task's loop runs its channel groups outside its pixel pairs (see :func:`conv_kernel_func`).

    The outer loop's operand is read once, the inner one once per outer
    step: the order with fewer bytes read wins (the weights of a deep layer
    on a small image, 3x3 512 at 7 x 7: 4.7 MB of weights, 83 KB of input).
    """
    rows, per_line = g.tiling()
    pairs = g.n * -(-g.lines * per_line // 2) / cm
    groups = -(-g.o16 // 2) / cn
    a_bytes = g.n * g.cb * g.hp * g.row_bytes / cm
    b_bytes = g.o16 * g.cb * g.kh * g.kw * b_step_bytes(g.k_block, g.dtype) / cn
    return b_bytes + groups * a_bytes < a_bytes + pairs * b_bytes


def conv_kernel_func(g: ConvGeometry, chunks: int, bias: bool = False, request_permission: bool = True,
                     weights_outer: bool | None = None, requant=None, clip=None,
                     out_dtype: str | tuple[str, str] = "float32", residual: bool = False):
    """The AMX conv PrimFunc for ``g`` (its ``kb`` set, see :func:`k_block`).

    bf16 (``g.dtype``): ``(X, W, [bias], Out)``. ``X``: bf16 ``[N, C/kb, Hp,
    Wp, kb]`` (the packed input, or the relax input itself); ``W``:
    :func:`pack_conv_weight`; ``bias``: fp32 ``[O16*16]`` (zero-padded);
    ``Out``: fp32 ``[N, O/ob, OH, OW, ob]``.

    bf16 epilogue: ``clip = (lo, hi)`` clamps each output and ``out_dtype``
    ``"bfloat16"`` rounds it to bf16 (nearest even) for the next bf16 layer;
    either sends the C tiles through the stack buffer (a relu6 and the cast
    on the stored tile instead of one more pass over the fp32 output).
    ``residual``: an fp32 ``R`` of ``Out``'s shape (a skip connection),
    added after the bias and before the clamp, as the unfused program adds
    it. ``out_dtype=("float32", "bfloat16")``: two outputs from the same
    stored tile, the fp32 value and its bf16 cast (a block input that the
    next conv reads in bf16 and a later residual add in fp32). Parameters:
    ``(X, W, [bias], [R], Out, [Out_bf16])``.

    int8: ``(X, W, bias, multiplier, half, shift, Out)``, ``X`` uint8, ``W``
    int8, the four requantize constants of ``requant``
    (:meth:`~hago.backends.base.Requant.constants`, ``O16*16`` each) and
    ``Out`` ``requant.dtype`` ``[N, O16, OH, OW, 16]``: each C tile is stored
    (int32) into a stack buffer and requantized from there, bit-identical to
    realize's requantize of the int32 conv.

    ``chunks``: parallel tasks (the thread count). ``request_permission=False``
    leaves out the permission check (a process without it dies with SIGILL).
    ``weights_outer``: loop order of a task's blocks (default
    :func:`weights_outer_order`).
    """
    rows, per_line = g.tiling()
    tiles = g.lines * per_line
    pairs = -(-tiles // 2)
    groups = -(-g.o16 // 2)
    nmb, nnb = g.n * pairs, groups
    cm, cn = task_grid(nmb, nnb, max(1, int(chunks)))
    if weights_outer is None:
        weights_outer = weights_outer_order(g, cm, cn)
    odd_tiles, odd_blocks = tiles % 2 == 1, g.o16 % 2 == 1
    kb, dt = g.k_block, g.dtype
    int8 = dt == "int8"
    if int8 and (requant is None or bias or g.ob != LANES or residual or not isinstance(out_dtype, str)):
        raise ValueError("the AMX int8 conv needs a requant, no bias, residual or second output and 16-channel "
                         "output blocks")
    two = not isinstance(out_dtype, str)
    if two and tuple(out_dtype) != ("float32", BF16):
        raise ValueError(f"the AMX bf16 conv writes two outputs as (float32, bfloat16), not {out_dtype}")
    out_dtype = "float32" if two else out_dtype
    epilogue = clip is not None or out_dtype != "float32" or residual or two
    # the bias starts the C tiles when nothing else touches the output; with an epilogue it is that epilogue's
    # first add, so the sums are the unfused program's, (conv + bias) + residual, bit for bit
    tile_bias = bias and not epilogue
    ir = conv_ir(rows, kb, [(mt, nt) for mt in (1, 2) for nt in (1, 2)], tile_bias, dt)  # LLVM drops unused ones
    cfg = conv_config_fn(rows, kb, dt)
    image, direct, consecutive = g.mode == "image", g.direct and not epilogue, g.consecutive
    oh, ow, wp, line, o, ob = g.oh, g.ow, g.wp, g.line, g.o, g.ob
    plane = oh * ow  # output pixels of one channel block
    out_blocks = o // ob
    sub = LANES // ob  # output blocks per C tile column block
    sh, sw = g.strides
    i64 = T.int64
    lda = i64(g.pixel if image else sw * g.pixel)
    khstride, icstride = i64(g.row_bytes), i64(g.hp * g.row_bytes)
    bnext = i64(g.cb * g.kh * g.kw * b_step_bytes(kb, dt))
    cnext, ldc = i64(plane * 4 * LANES if direct else rows * 4 * LANES), i64(4 * LANES)
    vals = ELEMENT[dt][1]
    a_dtype, w_dtype = ("uint8", "int8") if int8 else (BF16, BF16)
    acc_dtype, out_dtype = ("int32", requant.dtype) if int8 else ("float32", out_dtype)
    check = bool(request_permission)
    attrs = {"tir.noalias": True, KERNEL_ATTR: CONV_AMX, IS_SCHEDULED: True, "op_pattern": OPAQUE}
    xshape = (g.n, g.cb, g.hp, wp, kb) if g.pitch is None else (g.n, 1, g.hp, g.row_pixels, g.pitch)
    wshape = (g.o16, g.cb, g.kh, g.kw, kb // vals, LANES, vals)
    oshape = (g.n, out_blocks, oh, ow, ob)
    steps = (i64(g.cb), i64(g.kh), i64(g.kw), icstride, khstride)

    def start(t):
        """Tile ``t``'s first GEMM row in its line (a last tile overlaps its neighbour rather than run past)."""
        return T.min(t % per_line * rows, line - rows)

    def input_pixel(t):
        """Padded input (row, column) of tile ``t``'s first row at tap (0, 0)."""
        if image:
            return start(t) // wp, start(t) % wp
        return t // per_line * sh, start(t) * sw

    def output_pixel(t, i):
        """Output pixel (index in a channel plane) of row ``i`` of tile ``t``; in ``image`` mode maybe a dropped one."""
        if image:
            v = start(t) + i
            return v if consecutive else v // wp * ow + v % wp
        return t // per_line * ow + start(t) + i

    def kept(t, i):
        """Whether row ``i`` of tile ``t`` is an output pixel (not a column between two output rows)."""
        return True if consecutive else (start(t) + i) % wp < ow

    def pair(mb):
        """``(image, first tile, second tile, tiles)`` of pixel-tile pair ``mb`` (an odd last pair has one tile)."""
        img, t0 = mb // pairs, mb % pairs * 2
        if odd_tiles:
            last = t0 + 1 == tiles
            return img, t0, T.if_then_else(last, t0, t0 + 1), T.if_then_else(last, 1, 2)
        return img, t0, t0 + 1, 2

    @T.macro
    def tile_call(X, Wt, cinit, Out, acc, slot, img, t0, t1, nb, mt, nt):
        """The micro-kernel: C tiles straight into ``Out`` (direct) or into ``acc[slot]``."""
        y0, x0 = T.meta_var(input_pixel(t0))
        y1, x1 = T.meta_var(input_pixel(t1))
        a0 = T.meta_var(T.address_of(X[img, 0, y0, x0, 0]))
        a1 = T.meta_var(T.address_of(X[img, 0, y1, x1, 0]))
        b = T.meta_var(T.address_of(Wt[2 * nb, 0, 0, 0, 0, 0, 0]))
        name = T.meta_var(conv_kernel_name(mt, nt, tile_bias, kb, dt))
        if direct:
            base = T.meta_var((img * out_blocks + 2 * nb) * plane)
            ext = T.meta_var((nt - 1) * plane * LANES + rows * LANES)
            c0 = T.meta_var(Out.access_ptr("w", offset=(base + output_pixel(t0, 0)) * LANES, extent=ext))
            c1 = T.meta_var(Out.access_ptr("w", offset=(base + output_pixel(t1, 0)) * LANES, extent=ext))
            T.call_extern("void", name, a0, a1, lda, b, bnext, cinit, c0, c1, cnext, ldc, *steps)
        else:
            off = T.meta_var(slot * 4 * rows * LANES)
            c0 = T.meta_var(acc.access_ptr("w", offset=off, extent=2 * rows * LANES))
            c1 = T.meta_var(acc.access_ptr("w", offset=off + 2 * rows * LANES, extent=2 * rows * LANES))
            T.call_extern("void", name, a0, a1, lda, b, bnext, cinit, c0, c1, cnext, ldc, *steps)

    @T.macro
    def block(X, Wt, bias_ptr, Out, acc, slot, mb, nb):
        """Output block ``(mb, nb)``: pixel-tile pair ``mb`` (image-major) by 32-channel group ``nb``."""
        img, t0, t1, _ = T.meta_var(pair(mb))
        cinit = T.meta_var(bias_ptr(nb))
        if odd_tiles and t0 + 1 == tiles:
            if odd_blocks and 2 * nb + 1 == g.o16:
                tile_call(X, Wt, cinit, Out, acc, slot, img, t0, t0, nb, 1, 1)
            else:
                tile_call(X, Wt, cinit, Out, acc, slot, img, t0, t0, nb, 1, 2)
        else:
            if odd_blocks and 2 * nb + 1 == g.o16:
                tile_call(X, Wt, cinit, Out, acc, slot, img, t0, t0 + 1, nb, 2, 1)
            else:
                tile_call(X, Wt, cinit, Out, acc, slot, img, t0, t0 + 1, nb, 2, 2)

    def with_skip(value, B, R, img, blk, q, jl):
        """``value`` plus its bias (when the epilogue adds it), then plus its residual (``residual``)."""
        if bias and not tile_bias:
            value = value + B[blk * ob + jl]
        return value + R[img, blk, q // ow, q % ow, jl] if residual else value

    @T.macro
    def epilogue(Of, acc, store, slot, mb, nb, B, R, Out2):
        """Block ``(mb, nb)``'s kept rows from ``acc[slot]`` into the output (and ``Out2``), each 16 channels as
        16 / ob vectors, the bias (where the tiles did not start from it) and then ``R`` added first."""
        img, t0, t1, mts = T.meta_var(pair(mb))
        for r in T.serial(mts):
            for i in T.serial(rows):
                t = T.meta_var(t0 + r)
                if kept(t, i):
                    q = T.meta_var(output_pixel(t, i))
                    for cc, jb in T.grid(2, sub):  # a missing second column tile fails the block check
                        blk = T.meta_var((2 * nb + cc) * sub + jb)
                        if blk < out_blocks:
                            for jl in T.vectorized(ob):
                                v = T.meta_var(with_skip(acc[slot, r, cc, i, jb * ob + jl], B, R, img, blk, q, jl))
                                Of[((img * out_blocks + blk) * plane + q) * ob + jl] = store(v, blk * ob + jl)
                                if two:
                                    Out2[img, blk, q // ow, q % ow, jl] = store(v, blk * ob + jl).astype(BF16)

    def decode(b, m0, nm, n0, nn):
        """The ``b``-th block of a task: ``(mb, nb)`` in the task's loop order (see :func:`weights_outer_order`)."""
        if weights_outer:
            return m0 + b % nm, n0 + b // nm
        return m0 + b // nn, n0 + b % nn

    @T.macro
    def body(X, Wt, bias_ptr, Out, store, B=None, R=None, Out2=None):
        if check:
            rc = T.call_extern("int32", REQUEST_FN)
            assert rc == 0, PERMISSION_MESSAGE
        Of = T.decl_buffer((g.n * out_blocks * plane * ob,), out_dtype, data=Out.data)  # flat view
        for task in T.parallel(cm * cn, annotations={IMPORT_PRAGMA: ir}):
            acc = T.decl_buffer((2, 2, 2, rows, LANES), acc_dtype, align=64)
            T.call_extern("void", cfg)
            n0 = T.meta_var(task % cn * nnb // cn)
            nn = T.meta_var((task % cn + 1) * nnb // cn - task % cn * nnb // cn)
            m0 = T.meta_var(task // cn * nmb // cm)
            nm = T.meta_var((task // cn + 1) * nmb // cm - task // cn * nmb // cm)
            if direct:
                for b in T.serial(nm * nn):
                    mb, nb = T.meta_var(decode(b, m0, nm, n0, nn))
                    block(X, Wt, bias_ptr, Out, acc, 0, mb, nb)
            else:
                # software pipelined: block b's tiles are computed (and stored to acc[b % 2]) before block
                # b - 1's rows are read back, so the tile stores have committed by then and the tile unit works
                # while the vector units run the epilogue
                for b in T.serial(nm * nn + 1):
                    if b < nm * nn:
                        mb, nb = T.meta_var(decode(b, m0, nm, n0, nn))
                        block(X, Wt, bias_ptr, Out, acc, b % 2, mb, nb)
                    if b > 0:
                        pm, pn = T.meta_var(decode(b - 1, m0, nm, n0, nn))
                        epilogue(Of, acc, store, (b - 1) % 2, pm, pn, B, R, Out2)
            T.call_extern("void", RELEASE_FN)

    def copy(value, channel):
        if clip is not None:
            value = tirx.min(tirx.max(value, tirx.const(float(clip[0]), "float32")),
                             tirx.const(float(clip[1]), "float32"))
        return value if out_dtype == "float32" else value.astype(out_dtype)

    oc = g.o16 * LANES
    if int8:
        attrs[KERNEL_ATTR] = CONV_AMX_INT8
        m_dtype = "float32" if requant.scale is not None else "int32"  # Requant.constants' second slot

        @T.prim_func
        def kernel_int8(X: T.Buffer(xshape, a_dtype), Wt: T.Buffer(wshape, w_dtype), RB: T.Buffer((oc,), "int32"),
                        RM: T.Buffer((oc,), m_dtype), RH: T.Buffer((oc,), "int64"), RS: T.Buffer((oc,), "int64"),
                        Out: T.Buffer(oshape, out_dtype)):
            T.func_attr(attrs)
            body(X, Wt, lambda nb: T.address_of(X[0, 0, 0, 0, 0]), Out,
                 lambda value, channel: requant_expr(value, channel, RB, RM, RH, RS, requant))

        return kernel_int8.without_attr("global_symbol")

    def bias_ptr(B, X):
        if tile_bias:
            return lambda nb: T.address_of(B[2 * nb * LANES])
        return lambda nb: T.address_of(X[0, 0, 0, 0, 0])  # C starts at zero: cinit unused

    @T.prim_func
    def kernel(X: T.Buffer(xshape, BF16), Wt: T.Buffer(wshape, BF16), B: T.Buffer((oc,), "float32"),
               R: T.Buffer(oshape, "float32"), Out: T.Buffer(oshape, out_dtype), Out2: T.Buffer(oshape, BF16)):
        T.func_attr(attrs)
        body(X, Wt, bias_ptr(B, X), Out, copy, B, R, Out2)

    used = {"X": True, "Wt": True, "B": bias, "R": residual, "Out": True, "Out2": two}
    return _without_params(kernel, [name for name, keep in used.items() if not keep]).without_attr("global_symbol")


def _without_params(func: tirx.PrimFunc, names) -> tirx.PrimFunc:
    """``func`` without the buffer parameters ``names``, which its body never reads (one TVMScript kernel
    serves every combination of optional bias, residual and second output)."""
    params = [p for p in func.params if p.name not in set(names)]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


# ---- Relax --------------------------------------------------------------------------------
def emit_conv2d_amx_bf16(bb: relax.BlockBuilder, x: relax.Expr, w_oihw: np.ndarray, g: ConvGeometry,
                         bias=None, threads: int | None = None, request_permission: bool = True, clip=None,
                         out_dtype: str | tuple[str, str] = "float32", residual: relax.Expr | None = None
                         ) -> relax.Expr:
    """The conv of ``g`` on blocked ``x`` (bf16 or fp32) and float/bf16 ``w_oihw``: ``NCHW{ob}c``.

    ``bias``: optional fp32 ``[O]``, added in the tiles. ``clip`` (lo, hi)
    and ``out_dtype`` (``"float32"`` or ``"bfloat16"``): the epilogue on the
    stored tiles (:func:`conv_kernel_func`), ``("float32", "bfloat16")`` for
    a tuple of both; ``residual``: an fp32 tensor of the output's shape added
    before the clamp. ``threads``: parallel tasks
    (default ``dense.default_threads()``, the target's ``num-cores``). The
    target needs AMX (``mcpu`` sapphirerapids or later).
    """
    in_dtype = str(bb.normalize(x).ty.dtype)
    if g.kb is None:
        g = dataclasses.replace(g, kb=k_block(g, in_dtype))
    if needs_pack(g, in_dtype):
        pack = bb.add_func(pack_data_func(g, in_dtype), "hago_pack_amx_conv")
        x = bb.emit(relax.call_tir(pack, [x], relax.TensorType((g.n, g.cb, g.hp, g.wp, g.k_block), BF16)))
    func = conv_kernel_func(g, threads or default_threads(), bias is not None, request_permission, clip=clip,
                            out_dtype=out_dtype, residual=residual is not None)
    gv = bb.add_func(func, "hago_conv2d_amx_bf16")
    args = [x, relax.const(tvm.runtime.tensor(pack_conv_weight(w_oihw, g.k_block)))]
    if bias is not None:
        b = np.zeros(g.o16 * LANES, np.float32)  # a tile load reads all 16 channels of the last block
        b[:g.o] = np.asarray(bias, np.float32).reshape(-1)
        args.append(relax.const(b))
    if residual is not None:
        args.append(residual)
    shape = (g.n, g.o // g.ob, g.oh, g.ow, g.ob)
    if isinstance(out_dtype, str):
        return bb.emit(relax.call_tir(gv, args, relax.TensorType(shape, out_dtype)))
    return bb.emit(relax.call_tir(gv, args, [relax.TensorType(shape, d) for d in out_dtype]))


def _ints(v) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


@dataclass(frozen=True)
class AmxBf16Conv:
    """A ``relax.nn.conv2d`` the AMX bf16 kernels take: its data, its output channels and block, and the
    emitter ``emit(bb, x, bias=None, clip=None, out_dtype="float32", threads=None, request_permission=True,
    residual=None)`` of the kernel call on (the visited) ``x``."""

    x: relax.Expr
    o: int
    ob: int
    emit: object


def amx_bf16_conv(call: relax.Call) -> AmxBf16Conv | None:
    """The AMX bf16 kernel for a ``relax.nn.conv2d``; None if none takes it.

    Takes data ``NCHW{ib}c`` (bf16 or fp32), a ``relax.Constant`` weight
    ``OIHW{ib}i{ob}o`` with the same ``ob`` as ``out_layout = NCHW{ob}c``, an
    fp32 result, static shapes: the blocked conv (``ib`` 4..32), or a narrow
    stem whose one block holds all its channels (:mod:`.stem_bf16`).
    """
    from hago.backends.cpu.float_kernels import blocked_layouts

    if getattr(call.op, "name", "") != "relax.nn.conv2d":
        return None
    a = call.attrs
    blocks = blocked_layouts(a)
    x, w = call.args[0], call.args[1]
    if blocks is None or blocks[1] != blocks[2] or not isinstance(w, tvm.ir.expr.Constant):
        return None
    if str(a.out_dtype) not in ("", "float32") or str(x.ty.dtype) not in (BF16, "float32"):
        return None
    if str(w.ty.dtype) not in (BF16, "float32"):
        return None
    try:
        xshape, wshape = _ints(x.ty.shape), _ints(w.ty.shape)
    except (TypeError, ValueError):  # a symbolic dim (the batch of a calibration build)
        return None
    strides, padding, dilation = _ints(a.strides), _ints(a.padding), _ints(a.dilation)
    w_oihw = blocked_weight_to_oihw(w.value.numpy())
    if conv2d_amx_bf16_applicable(xshape, wshape, strides, padding, dilation, int(a.groups)):
        g = geometry(xshape, wshape, strides, padding)

        in_place = not needs_pack(dataclasses.replace(g, kb=k_block(g, BF16)), BF16)

        def emit(bb, x, bias=None, clip=None, out_dtype="float32", threads=None, request_permission=True,
                 residual=None):
            # a conv that packs its input anyway reads the fp32 value a cast to bf16 came from (the packing pass
            # rounds); one that reads bf16 blocks in place keeps the cast, which its producer's pass absorbs,
            # rather than gain a packing pass over fp32
            source = x if in_place else _fp32_source(bb, x)
            return emit_conv2d_amx_bf16(bb, source, w_oihw, g, bias, threads, request_permission,
                                        clip=clip, out_dtype=out_dtype, residual=residual)

        return AmxBf16Conv(x, g.o, g.ob, emit)
    from .stem_bf16 import blocked_stem

    return blocked_stem(x, xshape, w_oihw, strides, padding, dilation, int(a.groups), blocks[2])


def legalize_conv2d_amx_bf16(bb: relax.BlockBuilder, call: relax.Call, bias=None, threads: int | None = None,
                             request_permission: bool = True) -> relax.Expr | None:
    """The AMX kernel for a bf16 ``relax.nn.conv2d`` in hago's blocked layouts; None when it does not apply.

    See :func:`amx_bf16_conv`; returns the fp32 ``NCHW{ob}c`` conv (plus
    ``bias`` when given; otherwise bias and activation are the caller's
    epilogue, or :mod:`.bf16_epilogue` put them on the tiles already).
    """
    found = amx_bf16_conv(call)
    if found is None:
        return None
    return found.emit(bb, found.x, bias, threads=threads, request_permission=request_permission)
