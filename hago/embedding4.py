"""Row-wise 4-bit embedding tables: FBGEMM / caffe2's fused n-bit rowwise format, greedy range mode.

An embedding table is read one row at a time, so each row gets its own
affine grid (Guan et al., arXiv 1911.02079: 13.9% of the FP32 bytes with
neutral quality). Per row:

* **range** (:func:`greedy_ranges`): start from ``[min, max]`` with
  ``step = (max - min) / 200``; at each step move whichever end lowers the
  L2 error more by one step (the upper end on a tie); stop once the range is
  no longer wider than 168 steps (ratio 0.16); keep the best *strict* local
  minimum seen (lower than both of its neighbours and than the ``[min, max]``
  error), else ``[min, max]``;
* **parameters** (:func:`row_params`): the bias (``xmin``) is rounded to fp16,
  then ``scale = (xmax - bias) / 15`` (1 for an empty range) is rounded to
  fp16 (1 again if that is 0). Both are rounded *before* the codes are
  chosen, so the stored fp16 values reproduce the quantized row exactly;
* **codes**: ``q = clip(round_half_even((x - bias) / scale), 0, 15)``;
  ``x ~= scale * q + bias``. ``scale * q`` is exact in float32 (an 11-bit
  mantissa times a 4-bit integer), so a kernel that fuses the multiply-add
  gives the same float32 as numpy.

The error the greedy search minimizes is the one the stored row makes (fp16
parameters included), as a float64 sum of squares of the float32 errors.

Storage (:func:`pack`): codes two per byte, the even column in the low
nibble: ``uint8 [rows, ceil(dim / 2)]``, plus ``float16 [rows, 2]`` holding
(scale, bias). :func:`fuse` gives FBGEMM's fused row layout instead, one
``uint8 [rows, ceil(dim / 2) + 4]``: the packed codes, then the fp16 scale,
then the fp16 bias (little-endian bytes).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

BITS = 4
LEVELS = (1 << BITS) - 1  # 15: the largest code
N_BINS = 200
MIN_BINS = 168  # N_BINS * (1 - 0.16): the narrowest range the search tries, in steps
_CHUNK = 2048  # rows per vectorized block: a few MB of float32 work arrays


@dataclass(frozen=True)
class Rowwise4:
    """A table quantized row-wise to 4 bits (see the module docstring for the format)."""

    packed: np.ndarray  # uint8 [rows, ceil(dim / 2)], even column in the low nibble
    scale_bias: np.ndarray  # float16 [rows, 2]: (scale, bias)
    dim: int

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scale_bias.nbytes)


def row_params(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(scale, bias)`` per row for the range ``[lo, hi]``, both already fp16 values."""
    bias = np.asarray(lo, np.float32).astype(np.float16).astype(np.float32)
    span = np.asarray(hi, np.float32) - bias
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = np.where(span == 0, np.float32(1), span / np.float32(LEVELS)).astype(np.float32)
        scale = scale.astype(np.float16).astype(np.float32)
    scale = np.where((scale == 0) | ~np.isfinite(np.float32(1) / scale), np.float32(1), scale)
    return scale.astype(np.float32), bias


def _codes(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """float32 codes 0..15 of rows ``x`` [R, D] under per-row ``scale``, ``bias`` [R]."""
    inv = (np.float32(1) / scale)[:, None]
    return np.clip(np.rint((x - bias[:, None]) * inv), 0, LEVELS).astype(np.float32)


def _loss(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sum of squared errors per row of ``x`` [R, D] stored with the range ``[lo, hi]`` (float64 [R])."""
    scale, bias = row_params(lo, hi)
    err = (_codes(x, scale, bias) * scale[:, None] + bias[:, None] - x).astype(np.float64)
    return np.sum(err * err, axis=1)


def _greedy_block(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`greedy_ranges` of one block of rows, all rows stepping together."""
    xmin, xmax = x.min(axis=1), x.max(axis=1)
    step = (xmax - xmin) / np.float32(N_BINS)
    thr = np.float32(MIN_BINS) * step
    best_lo, best_hi = xmin.copy(), xmax.copy()
    cur_lo, cur_hi = xmin.copy(), xmax.copy()
    cur = _loss(x, xmin, xmax)
    best = cur.copy()
    active = cur_lo + thr < cur_hi
    while active.any():
        rows = np.nonzero(active)[0]
        xs, lo, hi, st = x[rows], cur_lo[rows], cur_hi[rows], step[rows]
        up_lo, down_hi = (lo + st).astype(np.float32), (hi - st).astype(np.float32)
        loss_lo, loss_hi = _loss(xs, up_lo, hi), _loss(xs, lo, down_hi)
        c = cur[rows]
        found = (c < loss_lo) & (c < loss_hi) & (c < best[rows])
        best[rows[found]] = c[found]
        best_lo[rows[found]], best_hi[rows[found]] = lo[found], hi[found]
        move_lo = loss_lo < loss_hi
        cur_lo[rows] = np.where(move_lo, up_lo, lo)
        cur_hi[rows] = np.where(move_lo, hi, down_hi)
        cur[rows] = np.where(move_lo, loss_lo, loss_hi)
        active[rows] = cur_lo[rows] + thr[rows] < cur_hi[rows]
    return best_lo, best_hi


def greedy_ranges(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The greedy ``(lo, hi)`` float32 range of every row of ``table`` [rows, dim] (module docstring)."""
    x = np.ascontiguousarray(table, np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"a row-wise table must be a finite 2-D float array, got shape {x.shape}")
    lo, hi = np.empty(len(x), np.float32), np.empty(len(x), np.float32)
    for s in range(0, len(x), _CHUNK):
        lo[s:s + _CHUNK], hi[s:s + _CHUNK] = _greedy_block(x[s:s + _CHUNK])
    return lo, hi


def quantize_rows(table: np.ndarray, greedy: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes uint8 [rows, dim], scale, bias float32 [rows])`` of ``table``; ``greedy=False``: min/max ranges."""
    x = np.ascontiguousarray(table, np.float32)
    lo, hi = greedy_ranges(x) if greedy else (x.min(axis=1), x.max(axis=1))
    scale, bias = row_params(lo, hi)
    codes = np.empty(x.shape, np.uint8)
    for s in range(0, len(x), _CHUNK):
        codes[s:s + _CHUNK] = _codes(x[s:s + _CHUNK], scale[s:s + _CHUNK], bias[s:s + _CHUNK])
    return codes, scale, bias


def pack(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> Rowwise4:
    """Two codes per byte (even column low), an odd last column padded with a zero nibble."""
    rows, dim = codes.shape
    c = np.zeros((rows, dim + dim % 2), np.uint8)
    c[:, :dim] = codes
    packed = (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)
    sb = np.stack([scale, bias], axis=1).astype(np.float16)
    return Rowwise4(packed, sb, dim)


def unpack(q: Rowwise4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, scale, bias)`` back from :func:`pack` (scale and bias as float32)."""
    codes = np.empty((len(q.packed), 2 * q.packed.shape[1]), np.uint8)
    codes[:, 0::2], codes[:, 1::2] = q.packed & 0xF, q.packed >> 4
    sb = q.scale_bias.astype(np.float32)
    return codes[:, :q.dim], sb[:, 0], sb[:, 1]


def dequantize(q: Rowwise4, rows: np.ndarray | None = None) -> np.ndarray:
    """float32 ``scale * code + bias`` of every row, or of the row ids ``rows`` (out: ``rows.shape + [dim]``)."""
    if rows is not None:
        idx = np.asarray(rows)
        sub = Rowwise4(q.packed[idx.reshape(-1)], q.scale_bias[idx.reshape(-1)], q.dim)
        return dequantize(sub).reshape(*idx.shape, q.dim)
    codes, scale, bias = unpack(q)
    return codes.astype(np.float32) * scale[:, None] + bias[:, None]


def fuse(q: Rowwise4) -> np.ndarray:
    """FBGEMM's fused rows: uint8 [rows, ceil(dim / 2) + 4] = packed codes, fp16 scale, fp16 bias."""
    sb = np.ascontiguousarray(q.scale_bias.astype("<f2")).view(np.uint8)
    return np.concatenate([q.packed, sb], axis=1)


def unfuse(rows: np.ndarray, dim: int) -> Rowwise4:
    """:func:`fuse` inverted (``dim``: the table's width, which an odd width needs)."""
    rows = np.ascontiguousarray(rows, np.uint8)
    sb = np.ascontiguousarray(rows[:, -4:]).view("<f2").astype(np.float16)
    return Rowwise4(np.ascontiguousarray(rows[:, :-4]), sb, dim)


_CACHE: OrderedDict[str, Rowwise4] = OrderedDict()


def quantize_table(table: np.ndarray) -> Rowwise4:
    """The packed greedy 4-bit form of ``table``, cached by content (realize and simulate share one search)."""
    from .graph import weight_key

    key = weight_key(table)
    if key not in _CACHE:
        _CACHE[key] = pack(*quantize_rows(table))
        while len(_CACHE) > 4:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]
