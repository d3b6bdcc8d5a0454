"""Packed 4-bit dense and conv weights for ``vpdpbusd``: two signed nibbles per byte (numpy, no TVM).

The packed weight of a dense ``w [K, N]`` (int8 values in [-8, 7]) is uint8
``[Np/16, Kp/8, 16, 4]`` (``Np``, ``Kp``: N and K rounded up to 16 and 8,
the padding zero weights), and byte ``p[nb, kb, l, b]`` holds

* low nibble (bits 0-3): ``w[8*kb + b, 16*nb + l]``,
* high nibble (bits 4-7): ``w[8*kb + 4 + b, 16*nb + l]``,

each as a two's complement nibble (``w & 0xF``; a zero weight is nibble 0).

Why this order: the 64 bytes ``p[nb, kb]`` are one zmm load, laid out 16
lanes x 4 bytes exactly as ``vpdpbusd`` reads its signed operand (the int8
kernel's ``NK16n4k`` block). Its low nibbles are the 16x4 weight block of
``k = 8kb .. 8kb+3``, its high nibbles that of ``k = 8kb+4 .. 8kb+7``: one
load feeds two ``vpdpbusd`` steps, one with the broadcast activation bytes
``x[8kb : 8kb+4]``, the other with ``x[8kb+4 : 8kb+8]``. The kernel
(:mod:`.vnni_int4`) never sign-extends a nibble: ``p & 0xF0`` read as a
signed byte is exactly ``16 * w_high``, ``p << 4`` (bytes) is ``16 * w_low``.
"""

from __future__ import annotations

import numpy as np

from ..nibbles import INT4_MAX, INT4_MIN, fits_int4  # noqa: F401  (fits_int4: the kernels import it from here)

LANES, RED = 16, 4  # vpdpbusd: 16 int32 lanes x 4 bytes
K_BLOCK = 2 * RED  # k values per packed byte group: 4 in the low nibbles, 4 in the high


def _up(v: int, m: int) -> int:
    return -(-v // m) * m


def packed_shape(k: int, n: int) -> tuple[int, int, int, int]:
    """The packed weight's shape for a ``[k, n]`` dense weight."""
    return _up(n, LANES) // LANES, _up(k, K_BLOCK) // K_BLOCK, LANES, RED


def pack_int4_dense(w_kn: np.ndarray) -> np.ndarray:
    """int8 ``[K, N]`` in [-8, 7] -> uint8 ``[Np/16, Kp/8, 16, 4]``, two weights per byte (see the module docstring)."""
    w = np.asarray(w_kn)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.integer) or not fits_int4(w):
        raise ValueError(f"pack_int4_dense needs integer [K, N] weights in [{INT4_MIN}, {INT4_MAX}]")
    k, n = w.shape
    nb, kb, _, _ = packed_shape(k, n)
    full = np.zeros((kb * K_BLOCK, nb * LANES), np.uint8)
    full[:k, :n] = w.astype(np.int8).view(np.uint8) & 0x0F  # two's complement nibbles
    # [Kp, Np] -> [nb, lane, kb, half, b]: k = 8 kb + 4 half + b, n = 16 nb + lane
    t = full.T.reshape(nb, LANES, kb, 2, RED)
    return np.ascontiguousarray((t[:, :, :, 0] | (t[:, :, :, 1] << 4)).transpose(0, 2, 1, 3))


def unpack_int4_dense(packed: np.ndarray, k: int, n: int) -> np.ndarray:
    """The int8 ``[k, n]`` weight of ``pack_int4_dense``'s output (padding dropped)."""
    p = np.asarray(packed, np.uint8)
    nb, kb, lanes, red = p.shape
    if (lanes, red) != (LANES, RED) or (nb, kb) != packed_shape(k, n)[:2]:
        raise ValueError(f"packed shape {p.shape} is not that of a [{k}, {n}] weight")
    halves = np.stack([p & 0x0F, p >> 4], axis=2)  # [nb, kb, half, lane, b]
    nib = halves.transpose(1, 2, 4, 0, 3).reshape(kb * K_BLOCK, nb * LANES)  # [k, n]
    signed = nib.astype(np.int8) - (nib >= 8).astype(np.int8) * 16
    return np.ascontiguousarray(signed[:k, :n].astype(np.int8))


# ---- conv2d -------------------------------------------------------------------
# The conv weight is the int8 kernel's ``OIHW{b/4}i16o4i`` block with pairs of
# consecutive 4-channel groups folded into one byte: uint8
# ``[Op/16, Ip/b, KH, KW, b/8, 16, 4]`` (``b``, the input channel block, 16 or
# 8: see :func:`conv_in_block`), byte ``[oc, ic, y, x, g, l, s]`` holding
#
# * low nibble: ``w[16 oc + l, b ic + 8 g + s, y, x]``,
# * high nibble: ``w[16 oc + l, b ic + 8 g + 4 + s, y, x]``,
#
# so one 64-byte load is again two ``vpdpbusd`` steps, over the activation
# bytes ``8g .. 8g+3`` and ``8g+4 .. 8g+7`` of one NCHW{b}c pixel.
def conv_in_block(c_per_group: int) -> int:
    """The packed conv's input channel block: 16 where the channels, padded to 8, divide by 16, else 8.

    Never 4 (the int8 kernel's block for e.g. 12 channels): a byte's two
    nibbles need two 4-channel groups of the same pixel, so the channels are
    padded to a multiple of 8 (zero weights; 4 more MACs per pixel at most).
    """
    return 16 if _up(c_per_group, K_BLOCK) % 16 == 0 else K_BLOCK


def pack_int4_conv(w_oihw: np.ndarray, groups: int = 1, in_channels: int | None = None) -> np.ndarray:
    """int8 OIHW in [-8, 7] -> uint8 ``[Op/16, Ip/b, KH, KW, b/8, 16, 4]`` (layout above).

    One group: O padded to 16 and I to 8 (or to ``in_channels``, the
    channel count of a blocked NCHW16c input, where ``b = 16``). Grouped: no
    padding (each group must have a multiple of 8 input and 16 output channels).
    """
    w = np.asarray(w_oihw)
    if w.ndim != 4 or not np.issubdtype(w.dtype, np.integer) or not fits_int4(w):
        raise ValueError(f"pack_int4_conv needs integer OIHW weights in [{INT4_MIN}, {INT4_MAX}]")
    o, i, kh, kw = w.shape
    if groups == 1:
        b = LANES if in_channels is not None else conv_in_block(i)
        op, ip = _up(o, LANES), (_up(i, K_BLOCK) if in_channels is None else int(in_channels))
    else:
        b, op, ip = conv_in_block(i), o, i
    if ip % b or op % LANES or ip < i:
        raise ValueError(f"conv weight {w.shape} groups={groups}: channels do not fit {b}-channel blocks")
    full = np.zeros((op, ip, kh, kw), np.uint8)
    full[:o, :i] = w.astype(np.int8).view(np.uint8) & 0x0F
    # [O, I, y, x] -> [oc, l, ic, g, half, s, y, x] -> [oc, ic, y, x, g, l, s] per half
    t = full.reshape(op // LANES, LANES, ip // b, b // K_BLOCK, 2, RED, kh, kw).transpose(0, 2, 6, 7, 3, 4, 1, 5)
    return np.ascontiguousarray(t[..., 0, :, :] | (t[..., 1, :, :] << 4))
