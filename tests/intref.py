"""Independent numpy reference for hago's realized integer kernels.

This module is the *oracle* for bit-exactness tests.  It is written from the
math only (it does not import or mirror hago), in plain numpy with all integer
arithmetic carried out in ``np.int64`` (or Python ints) and results cast to the
stated dtype at the end.

Rounding conventions (the contract the TVM kernels must match)
---------------------------------------------------------------
* ``quantize``: matches TVM 0.27 ``relax.op.quantize`` exactly.  TVM legalizes
  it to ``clip_cast(round(x / scale) + zp)`` where the division is an IEEE
  float32 division (not a multiplication by the reciprocal) and ``round`` is
  LLVM ``nearbyint`` i.e. **round half to even** (0.5 -> 0, 1.5 -> 2,
  2.5 -> 2, -0.5 -> -0, -1.5 -> -2).  Verified empirically in
  ``test_intref.py`` against a compiled relax function on exact ties and on
  ~800k near-tie values.  The reference therefore computes ``x / scale`` in
  float32, rounds with ``np.rint`` (half-to-even), adds zp, clips.
* ``dequantize``: matches TVM: ``float32(q - zp) * float32(scale)``.
* ``requantize_fixed_point`` / ``rescale_fixed_point``: exact
  ``acc * multiplier / 2**shift`` rounded **half away from zero** (single
  rounding, *not* gemmlowp's double rounding SaturatingRoundingDoublingHighMul +
  RoundingDivideByPOT, and *not* TVM qnn's "UPWARD" half-toward-+inf).
  Implemented as ``p = acc * mult`` (int64), ``r = (|p| + 2**(shift-1)) >> shift``,
  ``y = sign(p) * r``.
* ``add_int_fixed``: each input is rescaled separately with its own
  ``(multiplier, shift) = decompose_scale(in_scale / out_scale)`` using the
  half-away-from-zero fixed-point rescale above (no zp, no clip), the two
  int terms are summed, ``out_zp`` is added, and the result is clipped.
* Average pools: int sum of ``(q - zp)`` (padded positions hold real 0, i.e.
  ``q == zp``, contributing 0), then rounded integer division by the element
  count **half away from zero**, then ``+ zp``.  Note: rounding is done on
  the zero-point-centred value, which is *not* the same as rounding the raw
  ``sum(q)/count`` (half-away-from-zero is not invariant under integer shifts).
* ``decompose_scale``: ``real = m * 2**e`` (``np.frexp``, m in [0.5, 1)),
  ``multiplier = round_half_away(m * 2**31)``, ``shift = 31 - e``; if the
  rounding gives ``2**31`` the result is renormalised to ``(2**30, shift-1)``.
  So ``multiplier`` is in ``[2**30, 2**31)`` and the relative error is at most
  ``2**-31``.  ``shift`` must lie in ``[1, 62]`` (i.e. ``2**-32 <= real < 2**30``
  roughly); otherwise ``ValueError``.

Layouts: conv / pools are NCHW with OIHW weights; padding tuples are
``(top, left, bottom, right)``; dense is ``x[M, K] @ w[K, N]``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "round_half_away_from_zero",
    "rounding_divide",
    "infer_int_dtype",
    "quantize",
    "dequantize",
    "decompose_scale",
    "rescale_fixed_point",
    "requantize_fixed_point",
    "conv2d_int",
    "conv1d_int",
    "dense_int",
    "pack_int4",
    "unpack_int4",
    "dense_int4",
    "pack_int4_conv",
    "unpack_int4_conv",
    "conv2d_int4",
    "add_int_fixed",
    "add_int_exact",
    "relu_int",
    "max_pool2d_int",
    "avg_pool2d_int",
    "global_avg_pool_int",
    "matmul_requant_reference",
    "conv2d_requant_reference",
]

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def infer_int_dtype(qmin: int, qmax: int) -> np.dtype:
    """Smallest container for [qmin, qmax]; int8 preferred over uint8."""
    qmin, qmax = int(qmin), int(qmax)
    if qmin > qmax:
        raise ValueError(f"qmin {qmin} > qmax {qmax}")
    for dt in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dt)
        if info.min <= qmin and qmax <= info.max:
            return np.dtype(dt)
    raise ValueError(f"range [{qmin}, {qmax}] does not fit int32")


def _out_dtype(qmin, qmax, out_dtype):
    if out_dtype is None:
        return infer_int_dtype(qmin, qmax)
    dt = np.dtype(out_dtype)
    info = np.iinfo(dt)
    if not (info.min <= int(qmin) and int(qmax) <= info.max):
        raise ValueError(f"[{qmin}, {qmax}] does not fit {dt}")
    return dt


def _along_axis(v, ndim: int, axis):
    """Reshape a per-channel 1-D ``v`` to broadcast along ``axis`` of an
    ``ndim``-d tensor.  Scalars and ``axis=None`` are returned unchanged
    (plain numpy broadcasting)."""
    v = np.asarray(v)
    if axis is None or v.ndim == 0 or v.size == 1:
        return v.reshape(()) if v.size == 1 else v
    if v.ndim != 1:
        raise ValueError("per-channel parameter must be 1-D when axis is given")
    axis = axis % ndim
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _check_int(a, name):
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got {a.dtype}")
    return a


def round_half_away_from_zero(x):
    """Float rounding, ties away from zero (for float64 references only)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def rounding_divide(num, den):
    """Exact integer ``num / den`` rounded half away from zero (den > 0).

    ``|q| = floor((2|num| + den) / (2 den))``, sign of ``num`` restored.
    """
    num = np.asarray(num, dtype=np.int64)
    den = np.asarray(den, dtype=np.int64)
    if np.any(den <= 0):
        raise ValueError("den must be positive")
    mag = (2 * np.abs(num) + den) // (2 * den)
    return np.where(num < 0, -mag, mag)


# --------------------------------------------------------------------------
# quantize / dequantize  (TVM relax.op.quantize semantics)
# --------------------------------------------------------------------------
def quantize(x_f32, scale, zero_point, qmin, qmax, axis=None, out_dtype=None):
    """q = clip(rint_half_even(float32(x) / float32(scale)) + zp, qmin, qmax).

    Division in float32 and half-to-even rounding, exactly like TVM's
    ``relax.op.quantize`` (which clips to the out dtype's range; pass
    qmin/qmax = dtype min/max to reproduce it).  ``axis``: channel axis for
    1-D per-channel ``scale``/``zero_point``; ``None`` = numpy broadcasting.
    """
    x = np.asarray(x_f32, dtype=np.float32)
    s = _along_axis(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    zp = _along_axis(np.asarray(zero_point, dtype=np.int64), x.ndim, axis)
    dt = _out_dtype(qmin, qmax, out_dtype)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        r = np.rint(np.divide(x, s, dtype=np.float32))  # half-to-even
    # clamp to a safe int64 range before the integer conversion (inf etc.)
    r = np.clip(r.astype(np.float64), -(2.0**40), 2.0**40).astype(np.int64)
    q = np.clip(r + zp, int(qmin), int(qmax))
    return q.astype(dt)


def dequantize(q, scale, zp, axis=None):
    """float32(q - zp) * float32(scale)  (TVM relax.op.dequantize)."""
    q = _check_int(q, "q").astype(np.int64)
    s = _along_axis(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _along_axis(np.asarray(zp, dtype=np.int64), q.ndim, axis)
    return ((q - z).astype(np.float32) * s).astype(np.float32)


# --------------------------------------------------------------------------
# fixed-point scale decomposition and requantization
# --------------------------------------------------------------------------
def decompose_scale(real_scale):
    """real_scale ~= multiplier * 2**-shift, multiplier in [2**30, 2**31).

    Vectorised; returns ``(multiplier int32, shift int32)`` arrays of the
    input's shape (0-d arrays for scalar input).  Raises ``ValueError`` for
    non-positive / non-finite scales or shift outside [1, 62].
    """
    r = np.asarray(real_scale, dtype=np.float64)
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError(f"real_scale must be finite and > 0: {real_scale!r}")
    m, e = np.frexp(r)  # r = m * 2**e, m in [0.5, 1)
    # m * 2**31 is exact in float64 (power-of-two scaling); round half away.
    mult = np.floor(m * 2.0**31 + 0.5).astype(np.int64)
    shift = 31 - e.astype(np.int64)
    carry = mult == 2**31
    mult = np.where(carry, mult // 2, mult)
    shift = np.where(carry, shift - 1, shift)
    if np.any(shift < 1) or np.any(shift > 62):
        raise ValueError(f"shift out of [1, 62] for real_scale {real_scale!r}")
    assert np.all((mult >= 2**30) & (mult < 2**31))
    return mult.astype(np.int32), shift.astype(np.int32)


def rescale_fixed_point(x, multiplier, shift, axis=None):
    """round_half_away_from_zero(x * multiplier / 2**shift) as int64.

    No zero point, no clipping.  ``|x| <= 2**31``, ``|multiplier| < 2**31``,
    ``1 <= shift <= 62``.  ``axis`` as in :func:`quantize`.
    """
    x = _check_int(x, "x").astype(np.int64)
    mult = _along_axis(_check_int(multiplier, "multiplier").astype(np.int64), x.ndim, axis)
    sh = _along_axis(_check_int(shift, "shift").astype(np.int64), x.ndim, axis)
    if np.any(np.abs(x) > 2**31):
        raise ValueError("|x| must be <= 2**31")
    if np.any(np.abs(mult) >= 2**31):
        raise ValueError("|multiplier| must be < 2**31")
    if np.any(sh < 1) or np.any(sh > 62):
        raise ValueError("shift must be in [1, 62]")
    p = x * mult  # |p| < 2**62: exact in int64
    half = np.left_shift(np.int64(1), sh - 1)
    mag = np.right_shift(np.abs(p) + half, sh)  # < 2**62 + 2**61: no overflow
    return np.where(p < 0, -mag, mag)


def requantize_fixed_point(acc_i32, multiplier_i32, shift, zp_out, qmin, qmax,
                           axis=None, out_dtype=None):
    """y = clip(round_half_away(acc * multiplier / 2**shift) + zp_out, qmin, qmax).

    ``multiplier``/``shift``/``zp_out`` are scalars or arrays broadcastable to
    ``acc`` (or 1-D per-channel arrays with ``axis``).  Output dtype inferred
    from [qmin, qmax] (int8 preferred, then uint8, ...) unless given.
    """
    acc = _check_int(acc_i32, "acc").astype(np.int64)
    if np.any(acc < _INT32_MIN) or np.any(acc > _INT32_MAX):
        raise ValueError("acc out of int32 range")
    y = rescale_fixed_point(acc, multiplier_i32, shift, axis=axis)
    zp = _along_axis(np.asarray(zp_out, dtype=np.int64), acc.ndim, axis)
    dt = _out_dtype(qmin, qmax, out_dtype)
    return np.clip(y + zp, int(qmin), int(qmax)).astype(dt)


# --------------------------------------------------------------------------
# conv / dense accumulators
# --------------------------------------------------------------------------
def _to_int32(acc):
    if acc.size and (acc.min() < _INT32_MIN or acc.max() > _INT32_MAX):
        raise OverflowError("accumulator exceeds int32")
    return acc.astype(np.int32)


def conv2d_int(x_q, w_q, x_zp, stride=(1, 1), padding=(0, 0, 0, 0),
               dilation=(1, 1), groups=1):
    """int32 acc[n,o,oh,ow] = sum_{c,kh,kw} (xpad[n,g*Cg+c, ...] - x_zp) * w[o,c,kh,kw].

    x NCHW (uint8/int8), w OIHW int8 (symmetric, zp 0), ``O`` and ``C``
    divisible by ``groups``, w.shape[1] == C // groups.  Padded positions hold
    the real value 0, i.e. ``x - x_zp == 0`` there.  padding = (top, left,
    bottom, right).
    """
    x = _check_int(x_q, "x_q").astype(np.int64)
    w = _check_int(w_q, "w_q").astype(np.int64)
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    G = int(groups)
    if C % G or O % G or Cg != C // G:
        raise ValueError(f"bad groups={G} for x {x.shape}, w {w.shape}")
    sh, sw = stride
    dh, dw = dilation
    pt, pl, pb, pr = padding
    xc = np.pad(x - int(x_zp), ((0, 0), (0, 0), (pt, pb), (pl, pr)))  # zeros = real 0
    Hp, Wp = H + pt + pb, W + pl + pr
    OH = (Hp - dh * (KH - 1) - 1) // sh + 1
    OW = (Wp - dw * (KW - 1) - 1) // sw + 1
    if OH <= 0 or OW <= 0:
        raise ValueError("empty output")
    Og = O // G
    xg = xc.reshape(N, G, Cg, Hp, Wp)
    wg = w.reshape(G, Og, Cg, KH, KW)
    acc = np.zeros((N, G, Og, OH, OW), dtype=np.int64)
    for kh in range(KH):
        for kw in range(KW):
            h0, w0 = kh * dh, kw * dw
            patch = xg[:, :, :, h0:h0 + sh * (OH - 1) + 1:sh, w0:w0 + sw * (OW - 1) + 1:sw]
            # patch [N,G,Cg,OH,OW], weight [G,Og,Cg]
            acc += np.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, kh, kw])
    return _to_int32(acc.reshape(N, O, OH, OW))


def conv1d_int(x_q, w_q, x_zp, stride=1, padding=(0, 0), dilation=1, groups=1):
    """int32 acc[n,o,t] = sum_{c,k} (xpad[n, g*Cg+c, t*stride + k*dilation] - x_zp) * w[o,c,k].

    x NCW (uint8/int8), w OIW int8; padding = (left, right), padded positions
    hold the real value 0. Written as its own loop over taps (not through
    :func:`conv2d_int`), so it also checks that a 1-D conv run as a 2-D one
    of unit height is the same function.
    """
    x = _check_int(x_q, "x_q").astype(np.int64)
    w = _check_int(w_q, "w_q").astype(np.int64)
    N, C, W = x.shape
    O, Cg, K = w.shape
    G = int(groups)
    if C % G or O % G or Cg != C // G:
        raise ValueError(f"bad groups={G} for x {x.shape}, w {w.shape}")
    left, right = padding
    xc = np.pad(x - int(x_zp), ((0, 0), (0, 0), (left, right)))
    OW = (W + left + right - dilation * (K - 1) - 1) // stride + 1
    if OW <= 0:
        raise ValueError("empty output")
    Og = O // G
    acc = np.zeros((N, O, OW), dtype=np.int64)
    for o in range(O):
        g = o // Og
        for k in range(K):
            start = k * dilation
            taps = xc[:, g * Cg:(g + 1) * Cg, start:start + stride * (OW - 1) + 1:stride]  # [N, Cg, OW]
            acc[:, o, :] += np.einsum("nct,c->nt", taps, w[o, :, k])
    return _to_int32(acc)


def dense_int(x_q, w_q, x_zp):
    """int32 acc[m,n] = sum_k (x[m,k] - x_zp) * w[k,n];  x [M,K], w [K,N] int8."""
    x = _check_int(x_q, "x_q").astype(np.int64)
    w = _check_int(w_q, "w_q").astype(np.int64)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"bad shapes {x.shape} @ {w.shape}")
    return _to_int32((x - int(x_zp)) @ w)


# --------------------------------------------------------------------------
# packed 4-bit weights (x86 VNNI layout)
# --------------------------------------------------------------------------
# w [K, N] int4 (values -8..7) is stored as uint8 P[N16, K8, 16, 4] with
# N16 = ceil(N/16), K8 = ceil(K/8); missing (padded) weights are 0.  For
# k = 8*kb + 4*h + b and n = 16*nb + l, w[k, n] is nibble h (h=0: bits 0-3,
# h=1: bits 4-7) of P[nb, kb, l, b], in two's complement (w mod 16).
def _int4_positions(K, N):
    """(k, n) index grids of a [K, N] weight."""
    return np.meshgrid(np.arange(K), np.arange(N), indexing="ij")


def pack_int4(w_q):
    """int4 w [K, N] (any int dtype, values in [-8, 7]) -> uint8 [ceil(N/16), ceil(K/8), 16, 4]."""
    w = _check_int(w_q, "w_q").astype(np.int64)
    if w.ndim != 2 or w.size and (w.min() < -8 or w.max() > 7):
        raise ValueError("pack_int4 needs a 2-d weight with values in [-8, 7]")
    K, N = w.shape
    P = np.zeros((-(-N // 16), -(-K // 8), 16, 4), np.int64)
    k, n = _int4_positions(K, N)
    np.add.at(P, (n // 16, k // 8, n % 16, k % 4), np.mod(w, 16) << (4 * ((k % 8) // 4)))
    return P.astype(np.uint8)


def unpack_int4(packed, K, N):
    """uint8 P (layout above) -> int8 w [K, N]."""
    P = np.asarray(packed)
    if P.dtype != np.uint8 or P.shape != (-(-N // 16), -(-K // 8), 16, 4):
        raise ValueError(f"packed {P.dtype} {P.shape} is not a [{K}, {N}] int4 weight")
    k, n = _int4_positions(K, N)
    nib = (P[n // 16, k // 8, n % 16, k % 4].astype(np.int64) >> (4 * ((k % 8) // 4))) & 15
    return np.where(nib >= 8, nib - 16, nib).astype(np.int8)


def dense_int4(x_q, packed, K, N, x_zp):
    """int32 acc of x [M, K] times the packed int4 weight: unpack, then dense_int."""
    return dense_int(x_q, unpack_int4(packed, K, N), x_zp)


# Conv weights w [O, C, KH, KW] (int4) as uint8 P[ceil(O/16), Cp/B, KH, KW, B/8, 16, 4]
# with Cp = C rounded up to 8 (or a given padded count), B = 16 if 16 divides Cp
# else 8: for o = 16*ob + l and c = B*cb + 8*g + 4*h + s, w[o, c, y, x] is
# nibble h of P[ob, cb, y, x, g, l, s] (two's complement); padding weights are 0.
def _conv4_geometry(O, C, in_channels):
    Cp = -(-C // 8) * 8 if in_channels is None else int(in_channels)
    B = 16 if Cp % 16 == 0 else 8
    return Cp, B


def pack_int4_conv(w_q, in_channels=None):
    """int4 w [O, C, KH, KW] (values in [-8, 7]) -> uint8 P (layout above)."""
    w = _check_int(w_q, "w_q").astype(np.int64)
    if w.ndim != 4 or w.size and (w.min() < -8 or w.max() > 7):
        raise ValueError("pack_int4_conv needs a 4-d weight with values in [-8, 7]")
    O, C, KH, KW = w.shape
    Cp, B = _conv4_geometry(O, C, in_channels)
    P = np.zeros((-(-O // 16), Cp // B, KH, KW, B // 8, 16, 4), np.int64)
    o, c, y, x = np.meshgrid(*map(np.arange, w.shape), indexing="ij")
    np.add.at(P, (o // 16, c // B, y, x, (c % B) // 8, o % 16, c % 4), np.mod(w, 16) << (4 * ((c % 8) // 4)))
    return P.astype(np.uint8)


def unpack_int4_conv(packed, O, C, KH, KW, in_channels=None):
    """uint8 P (layout above) -> int8 w [O, C, KH, KW]."""
    P = np.asarray(packed)
    Cp, B = _conv4_geometry(O, C, in_channels)
    if P.dtype != np.uint8 or P.shape != (-(-O // 16), Cp // B, KH, KW, B // 8, 16, 4):
        raise ValueError(f"packed {P.dtype} {P.shape} is not a [{O}, {C}, {KH}, {KW}] int4 conv weight")
    o, c, y, x = np.meshgrid(np.arange(O), np.arange(C), np.arange(KH), np.arange(KW), indexing="ij")
    nib = (P[o // 16, c // B, y, x, (c % B) // 8, o % 16, c % 4].astype(np.int64) >> (4 * ((c % 8) // 4))) & 15
    return np.where(nib >= 8, nib - 16, nib).astype(np.int8)


def conv2d_int4(x_q, packed, w_shape, x_zp, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1),
                in_channels=None):
    """int32 conv of x NCHW with the packed int4 weight of OIHW ``w_shape``: unpack, then conv2d_int."""
    return conv2d_int(x_q, unpack_int4_conv(packed, *w_shape, in_channels=in_channels), x_zp, stride, padding,
                      dilation)


# --------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------
def add_int_fixed(a_q, a_scale, a_zp, b_q, b_scale, b_zp, out_scale, out_zp,
                  qmin, qmax, out_dtype=None):
    """Fixed-point quantized add.

    (ma, sa) = decompose_scale(float64(a_scale) / float64(out_scale))
    (mb, sb) = decompose_scale(float64(b_scale) / float64(out_scale))
    ta = round_half_away((a - a_zp) * ma / 2**sa)      # rescale_fixed_point
    tb = round_half_away((b - b_zp) * mb / 2**sb)
    y  = clip(ta + tb + out_zp, qmin, qmax)

    Scales are scalars (per-tensor).  a and b broadcast.
    """
    a = _check_int(a_q, "a_q").astype(np.int64)
    b = _check_int(b_q, "b_q").astype(np.int64)
    ma, sa = decompose_scale(np.float64(a_scale) / np.float64(out_scale))
    mb, sb = decompose_scale(np.float64(b_scale) / np.float64(out_scale))
    ta = rescale_fixed_point(a - int(a_zp), ma, sa)
    tb = rescale_fixed_point(b - int(b_zp), mb, sb)
    dt = _out_dtype(qmin, qmax, out_dtype)
    return np.clip(ta + tb + int(out_zp), int(qmin), int(qmax)).astype(dt)


def add_int_exact(a_q, a_scale, a_zp, b_q, b_scale, b_zp, out_scale, out_zp,
                  qmin, qmax, out_dtype=None):
    """Real-valued add (float64, one rounding half away from zero):
    clip(round(a_s/o_s*(a-a_zp) + b_s/o_s*(b-b_zp)) + out_zp).  For sanity
    checks only: |add_int_fixed - add_int_exact| <= 1."""
    a = _check_int(a_q, "a_q").astype(np.float64)
    b = _check_int(b_q, "b_q").astype(np.float64)
    v = (np.float64(a_scale) / np.float64(out_scale)) * (a - a_zp) + \
        (np.float64(b_scale) / np.float64(out_scale)) * (b - b_zp)
    y = round_half_away_from_zero(v).astype(np.int64) + int(out_zp)
    dt = _out_dtype(qmin, qmax, out_dtype)
    return np.clip(y, int(qmin), int(qmax)).astype(dt)


def relu_int(q, zp):
    """max(q, zp), dtype preserved."""
    q = _check_int(q, "q")
    return np.maximum(q.astype(np.int64), int(zp)).astype(q.dtype)


# --------------------------------------------------------------------------
# pooling (NCHW)
# --------------------------------------------------------------------------
def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def _windows(xp, KH, KW, sh, sw, OH, OW):
    """Yield strided views [N,C,OH,OW] for each kernel offset."""
    for kh in range(KH):
        for kw in range(KW):
            yield xp[:, :, kh:kh + sh * (OH - 1) + 1:sh, kw:kw + sw * (OW - 1) + 1:sw]


def _pool_geom(shape, pool, stride, padding):
    N, C, H, W = shape
    KH, KW = _pair(pool)
    sh, sw = _pair(stride)
    pt, pl, pb, pr = padding
    OH = (H + pt + pb - KH) // sh + 1
    OW = (W + pl + pr - KW) // sw + 1
    if OH <= 0 or OW <= 0:
        raise ValueError("empty output")
    return KH, KW, sh, sw, pt, pl, pb, pr, OH, OW


def max_pool2d_int(q, pool, stride, padding=(0, 0, 0, 0)):
    """Max pool; padded positions hold the dtype minimum. Dtype preserved."""
    q = _check_int(q, "q")
    KH, KW, sh, sw, pt, pl, pb, pr, OH, OW = _pool_geom(q.shape, pool, stride, padding)
    lo = np.iinfo(q.dtype).min
    xp = np.pad(q.astype(np.int64), ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=lo)
    out = np.full(q.shape[:2] + (OH, OW), lo, dtype=np.int64)
    for v in _windows(xp, KH, KW, sh, sw, OH, OW):
        out = np.maximum(out, v)
    return out.astype(q.dtype)


def avg_pool2d_int(q, zp, pool, stride, padding=(0, 0, 0, 0), count_include_pad=False):
    """y = rounding_divide(sum (q - zp), count) + zp   (half away from zero).

    Padded positions hold real 0 (q == zp) and contribute 0 to the sum.
    count = KH*KW if ``count_include_pad`` else the number of non-padded
    elements in the window (TVM's relax avg_pool2d default is False).
    The int sum must fit int32 (checked).  Dtype preserved.
    """
    q = _check_int(q, "q")
    KH, KW, sh, sw, pt, pl, pb, pr, OH, OW = _pool_geom(q.shape, pool, stride, padding)
    pad = ((0, 0), (0, 0), (pt, pb), (pl, pr))
    xp = np.pad(q.astype(np.int64) - int(zp), pad)
    valid = np.pad(np.ones(q.shape[2:], dtype=np.int64), pad[2:])[None, None]
    acc = np.zeros(q.shape[:2] + (OH, OW), dtype=np.int64)
    cnt = np.zeros((1, 1, OH, OW), dtype=np.int64)
    for v, m in zip(_windows(xp, KH, KW, sh, sw, OH, OW), _windows(valid, KH, KW, sh, sw, OH, OW)):
        acc += v
        cnt += m
    _to_int32(acc)
    if count_include_pad:
        cnt = np.full_like(cnt, KH * KW)
    y = rounding_divide(acc, cnt) + int(zp)
    info = np.iinfo(q.dtype)
    return np.clip(y, info.min, info.max).astype(q.dtype)


def global_avg_pool_int(q, zp):
    """NCHW -> NC11: rounding_divide(sum_{h,w} (q - zp), H*W) + zp, half away
    from zero. Dtype preserved."""
    q = _check_int(q, "q")
    N, C, H, W = q.shape
    acc = (q.astype(np.int64) - int(zp)).sum(axis=(2, 3), keepdims=True)
    _to_int32(acc)
    y = rounding_divide(acc, H * W) + int(zp)
    info = np.iinfo(q.dtype)
    return np.clip(y, info.min, info.max).astype(q.dtype)


# --------------------------------------------------------------------------
# full quantized layers
# --------------------------------------------------------------------------
def matmul_requant_reference(x_q, w_q, x_zp, bias_i32, multiplier, shift, zp_out,
                             qmin, qmax, out_dtype=None):
    """Quantized dense layer: acc = dense_int(x, w, x_zp) + bias (int32, [N]
    or None); y = requantize_fixed_point(acc, multiplier, shift, zp_out, qmin,
    qmax) with multiplier/shift scalar or per-output-channel [N]."""
    acc = dense_int(x_q, w_q, x_zp).astype(np.int64)
    if bias_i32 is not None:
        acc = acc + _check_int(bias_i32, "bias").astype(np.int64)
    acc = _to_int32(acc)
    return requantize_fixed_point(acc, multiplier, shift, zp_out, qmin, qmax,
                                  axis=-1, out_dtype=out_dtype)


def conv2d_requant_reference(x_q, w_q, x_zp, bias_i32, multiplier, shift, zp_out,
                             qmin, qmax, stride=(1, 1), padding=(0, 0, 0, 0),
                             dilation=(1, 1), groups=1, out_dtype=None):
    """Quantized conv layer: acc = conv2d_int(...) + bias[O] (int32 or None);
    y = requantize_fixed_point(acc, multiplier, shift, zp_out, qmin, qmax)
    with multiplier/shift scalar or per-output-channel [O] (axis=1)."""
    acc = conv2d_int(x_q, w_q, x_zp, stride, padding, dilation, groups).astype(np.int64)
    if bias_i32 is not None:
        acc = acc + _check_int(bias_i32, "bias").astype(np.int64).reshape(1, -1, 1, 1)
    acc = _to_int32(acc)
    return requantize_fixed_point(acc, multiplier, shift, zp_out, qmin, qmax,
                                  axis=1, out_dtype=out_dtype)
