"""Integer dense with packed 4-bit weights on x86 VNNI (W4A8): half the weight bytes, ``vpdpbusd`` kept.

No x86 instruction multiplies 4-bit values, so the weights are unpacked to
bytes in registers inside the reduction loop and multiplied by the uint8
activations with ``vpdpbusd``, as ONNX Runtime, llama.cpp and OpenVINO do.
The weight constant is uint8, two weights per byte, in the layout of
:mod:`.int4`: one 64-byte load holds a 16-lane x 8-k block, two
``vpdpbusd`` steps.

How a nibble becomes a ``vpdpbusd`` operand. The choices, per 64 packed
bytes (128 weights), the loads being equal:

* two's complement nibbles, unpacked to **16 x w**: ``p & 0xF0`` is the high
  nibble's weight times 16 as a signed byte, ``p << 4`` (``vpsllw`` + the
  ``0xF0`` mask LLVM adds for a byte shift) the low one's: 3 ALU ops. The
  accumulator is then exactly 16 x the int32 dot product and one arithmetic
  ``>> 4`` per output (in the write-back) restores it: exact, because every
  term is a multiple of 16, while ``16 * 255 * 8 * K < 2**31`` (K <= 65792,
  :func:`int4_applicable`);
* offset nibbles ``w + 8`` with the 8 subtracted per byte (``and``, shift,
  ``and``, two ``vpsubb``): 5 ops, to save nothing on the output side;
* unsigned nibbles 0..15 kept and the ``+8`` folded into a correction with
  the activation row sums: 3 ops too, but one more reduction over every
  activation row and a correction pass over the output.

The first is chosen: the fewest ops in the inner loop and nothing outside
it but a shift on the int32 tile. (ONNX Runtime puts the unsigned nibble in
``vpdpbusd``'s unsigned slot with signed activations; hago's activations
are the uint8 operand, so the weights must be the signed one.)

The kernel block carries ``hago.kernel = dense_int4_vnni`` and its default
schedule is :func:`.vnni_schedule.schedule_dense_int4`; untensorized (a
target without VNNI) the same TE computes the same integers, slowly.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from hago.errors import QuantizeError
from hago.tvm_consts import KERNEL_ATTR

from .int4 import K_BLOCK, LANES, RED, fits_int4, pack_int4_dense
from .vnni import _u8_shape, emit_packed_dense, vnni_applicable
from .vnni_intrin import weight16

DENSE_INT4 = "dense_int4_vnni"
#: the write-back block that divides the 16 x accumulator by 16 (the schedule computes it on the register tile)
DENSE_INT4_SHIFT = "hago_dense_int4_shift"
#: the largest padded K whose 16 x accumulator cannot overflow int32 (16 * 255 * 8 * K < 2**31)
MAX_K = (2**31 - 1) // (16 * 255 * 8) // K_BLOCK * K_BLOCK


def int4_applicable(x_shape, w_shape) -> bool:
    """Whether :func:`emit_dense_vnni_int4` takes a dense ``x [..., K] @ w [K, N]`` (static shapes, K <= MAX_K)."""
    if not vnni_applicable("dense", x_shape, w_shape):
        return False
    return -(-int(w_shape[0]) // K_BLOCK) * K_BLOCK <= MAX_K


def _dense_int4_te(a, wp):
    """``out[i, j] = sum_k a[i, k] * w[k, j]`` from the packed weight: the 16 x sum, then ``>> 4``."""
    m, kp = (int(s) for s in a.shape)
    ko = te.reduce_axis((0, kp // K_BLOCK), name="ko")
    half = te.reduce_axis((0, 2), name="half")
    b = te.reduce_axis((0, RED), name="b")
    acc = te.compute(
        (m, int(wp.shape[0]) * LANES),
        lambda i, j: te.sum(a[i, ko * K_BLOCK + half * RED + b].astype("int32")
                            * weight16(wp[j // LANES, ko, j % LANES, b], half), axis=[ko, half, b]),
        name=DENSE_INT4,
        attrs={KERNEL_ATTR: DENSE_INT4},
    )
    return te.compute(acc.shape, lambda i, j: tirx.shift_right(acc[i, j], tirx.const(4, "int32")),
                      name=DENSE_INT4_SHIFT)


def emit_dense_vnni_int4(bb: relax.BlockBuilder, x_u8: relax.Expr, w_kn_int8: np.ndarray) -> relax.Expr:
    """int32 ``x @ w`` for uint8 ``x [..., K]`` and int8 numpy ``w [K, N]`` with values in [-8, 7].

    The weight is stored packed (uint8, two per byte, :mod:`.int4`); the
    result is bit-identical to ``matmul(x, w, out_dtype="int32")`` and to
    :func:`.vnni.emit_dense_vnni` on the same ``w``. Leading dims of ``x``
    are flattened into M and restored; K is zero-padded to a multiple of 8.
    """
    xs = _u8_shape(bb, x_u8, "dense")
    w = np.asarray(w_kn_int8)
    if w.dtype != np.int8 or not fits_int4(w):
        raise QuantizeError(f"dense: packed 4-bit weights must be int8 in [-8, 7], got {w.dtype} "
                            f"in [{w.min(initial=0)}, {w.max(initial=0)}]")
    if not int4_applicable(xs, w.shape):
        raise QuantizeError(f"dense {xs} x {list(w.shape)}: no packed 4-bit kernel (shapes, or K > {MAX_K})")
    wp = pack_int4_dense(w)
    return emit_packed_dense(bb, x_u8, xs, w.shape, int(wp.shape[1]) * K_BLOCK,
                             lambda a: bb.emit_te(_dense_int4_te, a, relax.const(wp, "uint8"),
                                                  primfunc_name_hint="hago_dense_int4_vnni"))
