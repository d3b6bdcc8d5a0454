"""Signed 4-bit weights: the value range every backend's packed 4-bit kernels share (numpy only, no TVM).

A 4-bit weight is stored two per byte as a two's complement nibble. The x86
and ARM kernels both avoid sign-extending nibbles: ``p & 0xF0`` read as a
signed byte is exactly ``16 * w_high`` and ``p << 4`` (as a byte) is
``16 * w_low``, so the int8 dot-product instructions multiply 16x the weights
and one arithmetic ``>> 4`` of the int32 sum restores it exactly.
"""

from __future__ import annotations

import numpy as np

INT4_MIN, INT4_MAX = -8, 7


def fits_int4(w: np.ndarray) -> bool:
    """Whether every value of integer ``w`` is a signed 4-bit one."""
    w = np.asarray(w)
    return w.size == 0 or (int(w.min()) >= INT4_MIN and int(w.max()) <= INT4_MAX)
