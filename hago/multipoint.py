"""Multipoint quantization (Liu, Ye, Zhou, Liu 2020, "Post-training Quantization with Multiple Points:
Mixed Precision without Mixed Precision", arXiv 2002.09049).

Why: at 4 bits a few output channels carry most of a layer's error (a heavy
tail, an outlier weight that sets the channel's max-abs scale). Raising the
whole layer to 8 bits costs every channel; the paper keeps the bit width and
spends a little extra *width* instead: a channel's weight vector ``w`` is
approximated by a sum of low-bit vectors with scalar coefficients,

    w ~ a_1 q_1 + a_2 q_2 + ... + a_n q_n,   q_i integer at the layer's bits,

so the layer is ``sum_i a_i (q_i . x)``: extra output channels of the same
integer kernel, summed after the accumulation. Mixed precision without mixed
precision: the hardware runs one bit width.

How (greedy, after the paper; the per-point scale search below is hago's own):

* point 1 is the usual per-channel quantization at the layer's bits (exactly
  what realize would bake: max-abs scale, round to nearest, the bias floor);
* point ``k + 1`` quantizes the residual ``r = w - sum_{i<=k} a_i q_i`` with its
  own scalar ``a_{k+1}``: for a few candidate clip levels of ``r`` the codes
  ``q = clip(round(r / a0))`` and then the least-squares coefficient
  ``a = <q, r>_G / <q, q>_G``; the pair with the lowest output error wins;
* extra points go to the output channels with the largest *output* error
  ``||X (w_c - w_c_hat)||^2 = e_c^T G e_c`` (``G = X^T X / M`` over the layer's
  FP32 inputs on the calibration data; the identity, i.e. the weight error,
  without data), one at a time, re-measured after each, until the overhead
  budget is spent: ``budget`` extra channels per layer as a fraction of its
  output channels (default 0.1, at least one).

This module is the numpy method only; :mod:`hago.correct.multipoint` is the
plug-in that runs it on a calibrated strategy and stores the points
(:class:`ExtraPoints`, JSON, in ``OpChoice.multipoint``);
:mod:`hago.realize.multipoint` turns them into the integer program (extra
weight rows, the fused weighted sum) and the simulated twin's weight.

Weights are handled as rows ``[O, F]``: one row per output channel, ``F`` its
fan-in (a dense ``[K, N]`` weight is transposed; a conv's OIHW row is
``C*KH*KW``, the im2col order).
"""

from __future__ import annotations

import base64
import contextlib
import heapq
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import QuantizeError
from .qparams import fixed_point_multiplier, integer_range

#: candidate clip levels of the residual, as a fraction of its max-abs (point 2 onwards)
CLIP_LEVELS = np.linspace(0.3, 1.0, 15)
#: the most rows of the layer input used for its Gram matrix (a deterministic subsample above it)
MAX_GRAM_ROWS = 8192


@dataclass(frozen=True)
class ExtraPoints:
    """A layer's extra points: point ``j`` adds ``scales[j] * codes[j]`` to output channel ``channels[j]``."""

    channels: np.ndarray  # int64 [E]: source output channel of each extra point (a channel may repeat)
    scales: np.ndarray  # float32 [E]: the point's coefficient a_j (> 0)
    codes: np.ndarray  # int8 [E, F]: the point's integer vector at the layer's bits

    def __len__(self) -> int:
        return len(self.channels)

    def to_json(self) -> dict:
        """Plain JSON data: the codes packed (int8 bytes, zlib, base64), never pickled."""
        raw = np.ascontiguousarray(self.codes, np.int8).tobytes()
        return {"channels": [int(c) for c in self.channels], "scales": [float(s) for s in self.scales],
                "codes": base64.b64encode(zlib.compress(raw, 9)).decode("ascii")}

    @classmethod
    def from_json(cls, d: dict, out_channels: int, fan_in: int, bits: int) -> "ExtraPoints":
        """Decode and check against the layer (``out_channels`` x ``fan_in`` at ``bits``); one-line errors."""
        where = "strategy's multipoint"
        try:
            channels = np.asarray(d["channels"], np.int64)
            scales = np.asarray(d["scales"], np.float32)
            raw = np.frombuffer(zlib.decompress(base64.b64decode(d["codes"])), np.int8)
        except (KeyError, TypeError, ValueError, zlib.error) as e:
            raise QuantizeError(f"{where} is corrupt ({type(e).__name__}: {e}); re-run hago compile") from None
        e = len(channels)
        if channels.ndim != 1 or scales.shape != (e,) or raw.size != e * fan_in:
            raise QuantizeError(f"{where} holds {raw.size} codes for {e} points of {fan_in} weights; "
                                "re-run hago compile")
        if e and (channels.min() < 0 or channels.max() >= out_channels):
            raise QuantizeError(f"{where} names a channel outside the layer's {out_channels}; re-run hago compile")
        if not np.all(np.isfinite(scales) & (scales > 0)):
            raise QuantizeError(f"{where} has a coefficient that is not finite and positive; re-run hago compile")
        qmin, qmax = integer_range("int8", bits, narrow=True)
        codes = raw.reshape(e, fan_in)
        if codes.size and (codes.min() < qmin or codes.max() > qmax):
            raise QuantizeError(f"{where} has codes outside [{qmin}, {qmax}] ({bits} bits); re-run hago compile")
        return cls(channels, scales, codes.copy())


# ---- weight rows --------------------------------------------------------------------------
def to_rows(w: np.ndarray, kind: str) -> np.ndarray:
    """A weighted layer's weight as ``[O, F]`` rows (dense ``[K, N]`` -> ``[N, K]``; OIHW -> ``[O, C*KH*KW]``)."""
    return np.ascontiguousarray(w.T) if kind == "dense" else w.reshape(w.shape[0], -1)


def from_rows(rows: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`to_rows` for a weight of ``shape`` (``rows`` may have extra rows: extra channels)."""
    if kind == "dense":
        return np.ascontiguousarray(rows.T)
    return rows.reshape(rows.shape[0], *shape[1:])


def approximation(q1: np.ndarray, s1: np.ndarray, points: ExtraPoints | None) -> np.ndarray:
    """``w_hat`` rows (float64): ``s1[c] q1[c]`` plus every extra point of channel ``c``."""
    w = q1.astype(np.float64) * s1.astype(np.float64)[:, None]
    if points is not None and len(points):
        np.add.at(w, points.channels, points.codes.astype(np.float64) * points.scales.astype(np.float64)[:, None])
    return w


def rescale(points: ExtraPoints, s1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(multiplier, shift)`` per extra point: ``a_j / s1[c_j]`` in fixed point, the weighted sum's factor.

    The extra channel's int32 accumulator counts in units of ``s_x * a_j``, its
    source channel's in ``s_x * s1[c]``: the ratio brings one into the other.
    """
    ratio = points.scales.astype(np.float64) / s1.astype(np.float64)[points.channels]
    return fixed_point_multiplier(ratio, "fixed_point")


def ratio_fits(ratio: float) -> bool:
    """Whether ``ratio`` has a fixed-point form (shift in [1, 62]): what :func:`rescale` accepts."""
    try:
        fixed_point_multiplier(np.asarray([ratio]), "fixed_point")
    except QuantizeError:
        return False
    return True


# ---- output error -------------------------------------------------------------------------
def gram(x_rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """``G = X^T X / M`` (float64 ``[F, F]``) of input rows ``x_rows [M, F]`` (a deterministic subsample of
    :data:`MAX_GRAM_ROWS` rows when there are more)."""
    x = np.asarray(x_rows)
    if len(x) > MAX_GRAM_ROWS:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), MAX_GRAM_ROWS, replace=False))]
    x = x.astype(np.float64)
    return x.T @ x / max(1, len(x))


def dense_rows(x: np.ndarray) -> np.ndarray:
    """A dense layer's input ``[..., K]`` as rows ``[M, K]``."""
    return x.reshape(-1, x.shape[-1])


def conv_rows(x: np.ndarray, kernel: tuple[int, int], strides, padding, dilation) -> np.ndarray:
    """im2col of an NCHW input for a one-group conv: ``[N*OH*OW, C*KH*KW]`` (OIHW row order).

    ``padding`` is (top, left, bottom, right), zero (the FP32 conv's padding).
    """
    kh, kw = kernel
    top, left, bottom, right = padding
    sh, sw = strides
    dh, dw = dilation
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    win = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, OH, OW, KH, KW]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)


def conv_gram(x: np.ndarray, kernel: tuple[int, int], strides, padding, dilation, seed: int = 0) -> np.ndarray:
    """:func:`gram` of a conv's im2col rows, one sample at a time (at most :data:`MAX_GRAM_ROWS` rows in all,
    spread evenly over the samples), so the im2col of the whole calibration set never exists at once."""
    with _one_blas_thread():  # one small product per sample
        return _conv_gram(x, kernel, strides, padding, dilation, seed)


def _conv_gram(x, kernel, strides, padding, dilation, seed):
    rng = np.random.default_rng(seed)
    per = max(1, MAX_GRAM_ROWS // max(1, len(x)))
    total, count = None, 0
    for i in range(len(x)):
        rows = conv_rows(x[i:i + 1], kernel, strides, padding, dilation)
        if len(rows) > per:
            rows = rows[np.sort(rng.choice(len(rows), per, replace=False))]
        rows = rows.astype(np.float64)
        total = rows.T @ rows if total is None else total + rows.T @ rows
        count += len(rows)
    return total / max(1, count)


def output_errors(err_rows: np.ndarray, g: np.ndarray | None) -> np.ndarray:
    """``e_c^T G e_c`` per row (the weight error ``||e_c||^2`` when ``g`` is None)."""
    e = err_rows.astype(np.float64)
    if g is None:
        return (e * e).sum(axis=1)
    return np.einsum("of,of->o", e @ g, e)


def residual_point(r: np.ndarray, g: np.ndarray | None, qmax: int) -> tuple[float, np.ndarray, float] | None:
    """``(a, q, error)``: the point that best approximates residual ``r [F]``; None if none lowers its error.

    For each clip level ``t`` of :data:`CLIP_LEVELS`: ``q = clip(round(r / (t max|r| / qmax)))``, then the
    coefficient minimising ``||r - a q||_G`` for that ``q``, ``a = <q, r>_G / <q, q>_G``; the lowest error wins.
    """
    r = r.astype(np.float64)
    amax = float(np.abs(r).max(initial=0.0))
    if amax == 0.0:
        return None
    q = np.clip(np.round(r[None, :] / (CLIP_LEVELS[:, None] * amax / qmax)), -qmax, qmax)  # [T, F]
    gq = q if g is None else q @ g
    den = (gq * q).sum(axis=1)
    num = gq @ r
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(den > 0, num / den, 0.0)
        gain = np.where((den > 0) & (a > 0), num * num / den, -np.inf)  # ||r||_G^2 - error
    best = int(np.argmax(gain))
    if not np.isfinite(gain[best]) or gain[best] <= 0:
        return None
    base = float(r @ r) if g is None else float(r @ g @ r)
    return float(np.float32(a[best])), q[best].astype(np.int8), max(base - float(gain[best]), 0.0)


def extra_count(out_channels: int, budget: float) -> int:
    """Extra channels a layer of ``out_channels`` may get for ``budget`` (fraction of its channels, >= 1)."""
    if budget <= 0:
        return 0
    return max(1, int(round(budget * out_channels)))


def _one_blas_thread():
    """BLAS on one thread inside the ``with`` (threadpoolctl where installed, else unchanged).

    The greedy loop makes hundreds of small ``[T, F] x [F, F]`` products: on the shared,
    loaded 2-core machine OpenBLAS's threads made each ~30 ms against 0.15 ms on one thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - an optional speed-up
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def build_points(w: np.ndarray, q1: np.ndarray, s1: np.ndarray, g: np.ndarray | None, bits: int, extra: int,
                 max_points: int = 4) -> tuple[ExtraPoints, dict]:
    """The greedy allocation: ``extra`` points, each to the channel whose output error is largest now.

    ``w [O, F]`` are the float weight rows the layer approximates, ``q1`` / ``s1``
    its point 1 (the codes and per-channel scales realize bakes), ``g`` the
    input Gram matrix (None: weight error). A channel takes at most
    ``max_points`` points in all. Returns the points and a report: the summed
    output error with one point and with the extra ones.
    """
    with _one_blas_thread():
        return _build_points(w, q1, s1, g, bits, extra, max_points)


def _build_points(w, q1, s1, g, bits, extra, max_points):
    _, qmax = integer_range("int8", bits, narrow=True)
    resid = w.astype(np.float64) - q1.astype(np.float64) * s1.astype(np.float64)[:, None]
    err = output_errors(resid, g)
    before = float(err.sum())
    count = np.ones(len(w), np.int64)
    heap = [(-e, c) for c, e in enumerate(err) if e > 0]
    heapq.heapify(heap)
    channels, scales, codes = [], [], []
    while heap and len(channels) < extra:
        _, c = heapq.heappop(heap)
        if count[c] >= max_points:
            continue
        point = residual_point(resid[c], g, qmax)
        if point is None or not ratio_fits(point[0] / float(s1[c])):
            continue  # nothing left to gain on this channel
        a, q, e = point
        resid[c] -= a * q.astype(np.float64)
        err[c] = output_errors(resid[c:c + 1], g)[0]  # with a rounded to float32, as stored
        count[c] += 1
        channels.append(c)
        scales.append(a)
        codes.append(q)
        if err[c] > 0:
            heapq.heappush(heap, (-err[c], c))
    fan_in = w.shape[1]
    pts = ExtraPoints(np.asarray(channels, np.int64), np.asarray(scales, np.float32),
                      np.asarray(codes, np.int8).reshape(len(channels), fan_in))
    return pts, {"error_1": before, "error_n": float(err.sum()), "extra": len(pts)}
