"""Learned weight rounding stored in a strategy: one up/down bit per weight.

Round-to-nearest is not the best rounding for a layer's *output* (AdaRound,
Nagel et al. 2020): which way each weight rounds is a choice, and a
correction (:mod:`hago.correct.adaround`) may learn it. The strategy keeps
that choice as a bit per weight relative to ``floor(w / s)``, packed and
compressed (``OpChoice.weight_round``), with ``s`` the max-abs per-channel
scale of :func:`hago.qparams.weight_qparams`. :func:`rounded_weight` turns the
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
from hago.qparams import weight_qparams


def weight_axis(kind: str) -> int:
    """The output-channel axis of a weighted node's weight (dense stores ``[K, N]``)."""
    return 1 if kind == "dense" else 0


def grid(w: np.ndarray, kind: str, bits: int) -> tuple[np.ndarray, np.ndarray, object]:
    """``(w / s, s broadcastable to w, qparams)`` for the grid realize rounds ``w`` onto."""
    axis = weight_axis(kind)
    qp = weight_qparams(w, axis, bits)
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


def rounded_weight(w: np.ndarray, kind: str, bits: int, up: np.ndarray) -> np.ndarray:
    """Float weights on the quantization grid: ``s * clip(floor(w / s) + up, qmin, qmax)``."""
    ws, s, qp = grid(w, kind, bits)
    q = np.clip(np.floor(ws) + up, qp.qmin, qp.qmax)
    return (q * s).astype(np.float32)


def nearest_up(w: np.ndarray, kind: str, bits: int) -> np.ndarray:
    """The bits that reproduce round-to-nearest (ties away from floor), the starting point."""
    ws, _, _ = grid(w, kind, bits)
    return (ws - np.floor(ws)) >= 0.5
