"""Learned weight rounding stored in a strategy: one up/down bit per weight.

Round-to-nearest is not the best rounding for a layer's *output* (AdaRound,
Nagel et al. 2020): which way each weight rounds is a choice, and a
correction (:mod:`hago.correct.adaround`) may learn it. The strategy keeps
that choice as a bit per weight relative to ``floor(w / s)``, packed and
compressed (``OpChoice.weight_round``), with ``s`` the layer's per-channel
step: ``OpChoice.weight_scale`` where a correction set one (:mod:`hago.correct.weight_clip`),
else the max-abs scale of :func:`hago.qparams.weight_qparams`. :func:`rounded_weight` turns the
bits into float weights that lie exactly on that grid, so ``realize`` and
``simulate``, which round to nearest, quantize them to the learned integers
without knowing about the correction.

One caveat, by design: a channel whose scale ``realize`` floors
(:func:`hago.qparams.bias_scale_floor`, "dead" channels with weights ~1e-9)
gets a coarser grid, and there the learned bits round to nearest again; those
weights are zero either way.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

from hago.errors import QuantizeError
from hago.qparams import fixed_weight_qparams, weight_qparams


def weight_axis(kind: str) -> int:
    """The output-channel axis of a weighted node's weight (dense stores ``[K, N]``)."""
    return 1 if kind == "dense" else 0


def grid(w: np.ndarray, kind: str, bits: int, scale=None) -> tuple[np.ndarray, np.ndarray, object]:
    """``(w / s, s broadcastable to w, qparams)`` for the grid realize rounds ``w`` onto.

    ``scale``: the layer's own per-channel step (``OpChoice.weight_scale``, from
    :mod:`hago.correct.weight_clip` or :mod:`hago.qat`), which realize uses as it is;
    None: the max-abs step of :func:`hago.qparams.weight_qparams`.
    """
    axis = weight_axis(kind)
    if scale is None:
        qp = weight_qparams(w, axis, bits)
    else:
        qp = fixed_weight_qparams(np.asarray(scale, np.float32), axis, bits)
    shape = [1] * w.ndim
    shape[axis] = -1
    s = qp.scale.reshape(shape).astype(np.float32)
    return w.astype(np.float32) / s, s, qp


def encode(up: np.ndarray) -> str:
    """Bits (bool array, any shape) -> compact ASCII for the strategy JSON."""
    return base64.b64encode(zlib.compress(np.packbits(up.astype(bool).ravel()).tobytes(), 9)).decode("ascii")


def decode(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`encode` for a weight of ``shape``."""
    n = int(np.prod(shape))
    try:
        raw = np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8)
    except (ValueError, zlib.error) as e:
        raise QuantizeError(f"strategy's weight_round is corrupt ({e}); re-run hago compile") from None
    bits = np.unpackbits(raw)
    if len(bits) < n or len(bits) > n + 7:
        raise QuantizeError(f"strategy's weight_round holds {len(bits)} bits for a weight of {n}; re-run hago compile")
    return bits[:n].reshape(shape).astype(bool)


def encode_codes(codes: np.ndarray) -> str:
    """Integer weight codes (int8 container, any shape) -> compact ASCII for the strategy JSON."""
    return base64.b64encode(zlib.compress(np.ascontiguousarray(codes, np.int8).tobytes(), 9)).decode("ascii")


def decode_codes(text: str, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """The inverse of :func:`encode_codes` for a weight of ``shape``; codes outside ``bits``' range are refused."""
    try:
        raw = np.frombuffer(zlib.decompress(base64.b64decode(text)), np.int8)
    except (ValueError, zlib.error) as e:
        raise QuantizeError(f"strategy's weight_codes are corrupt ({e}); re-run hago compile") from None
    if raw.size != int(np.prod(shape)):
        raise QuantizeError(f"strategy's weight_codes hold {raw.size} codes for a weight of {int(np.prod(shape))}; "
                            "re-run hago compile")
    qmax = 2 ** (bits - 1) - 1
    if raw.size and np.abs(raw.astype(np.int16)).max() > qmax:
        raise QuantizeError(f"strategy's weight_codes leave the {bits}-bit range; re-run hago compile")
    return raw.reshape(shape)


def coded_weight(kind: str, bits: int, codes: str, scale, shape: tuple[int, ...]) -> np.ndarray:
    """Float weights exactly on the grid: ``codes * scale`` per output channel (realize rounds them back to ``codes``)."""
    axis = weight_axis(kind)
    s = np.asarray(scale, np.float32)
    if s.shape != (shape[axis],):
        raise QuantizeError(f"strategy's weight_scale has {s.size} values for {shape[axis]} output channels; "
                            "re-run hago compile")
    bshape = [1] * len(shape)
    bshape[axis] = -1
    return (decode_codes(codes, shape, bits).astype(np.float32) * s.reshape(bshape)).astype(np.float32)


def rounded_weight(w: np.ndarray, kind: str, bits: int, up: np.ndarray, scale=None) -> np.ndarray:
    """Float weights on the quantization grid: ``s * clip(floor(w / s) + up, qmin, qmax)``."""
    ws, s, qp = grid(w, kind, bits, scale)
    q = np.clip(np.floor(ws) + up, qp.qmin, qp.qmax)
    return (q * s).astype(np.float32)


def nearest_up(w: np.ndarray, kind: str, bits: int, scale=None) -> np.ndarray:
    """The bits that reproduce round-to-nearest (ties away from floor), the starting point."""
    ws, _, _ = grid(w, kind, bits, scale)
    return (ws - np.floor(ws)) >= 0.5
