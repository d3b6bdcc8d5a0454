"""Multipoint layers in the integer program and in the simulated twin (:mod:`hago.multipoint`).

A layer whose ``OpChoice.multipoint`` holds extra points runs ONE integer
kernel on a wider weight: the ``E`` extra points are extra output channels
appended after the layer's ``N`` (dense ``[K, N + E]``, conv ``[O + E, C, KH, KW]``),
so the backend's kernel (VNNI, packed 4-bit, NEON/dp4a after the swap) sees
just a wider weight. Each extra channel gets its own zero-point term
(``-zx * sum(q_j)``) in the int32 constant added after the kernel. Then the
fused weighted sum, before the requantize (or the dequantize of a float
output), in the Relax program::

    acc   = kernel(x_q, W_wide) + folded_wide            int32 [..., N + E]
    main  = strided_slice(acc, 0:N)                      the layer's channels
    for each level m (a channel's m-th extra point):
        p    = int64(take(acc, N + idx_m)) * M_m         M_m[c] = 0 where channel c has no m-th point
        main = main + int32(round_half_away(p >> s_m))   the point rescaled by a_j / s_c
    requantize(main) as for any layer

``M_m / 2^s_m`` is ``a_j / s_c`` (:func:`hago.multipoint.rescale`): the extra
accumulator counts in ``s_x a_j``, its source channel in ``s_x s_c``. After
FuseOps (x86, measured on a two-layer MLP) the folded add stays in the kernel's
PrimFunc, the rescale, the adds and the requantize are one fused pass, and each
level's ``take`` is a small gather kernel of its own (``[..., N]`` int32: TVM
does not fuse a gather into its consumers). The twin (``simulate``) gives the layer the float
weight ``s_c q_c + sum_j a_j q_j`` per channel: the same function, without the
fixed-point rounding of the rescale (at most half a unit of the accumulator).
A dense with a dynamic input rescales every column in float anyway
(:mod:`hago.dynamic`): there the extra columns get their ``a_j`` as column scale
and the sum is a float gather-add (:func:`emit_float_sum`).
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as O

from hago import multipoint as mp
from hago.errors import QuantizeError

from .quant import const, fake_quantized_weight

#: the weighted kinds a multipoint layer may have (a depthwise conv's channel is its own group: no extra rows)
KINDS = ("dense", "conv2d")


def layer_points(node, choice) -> mp.ExtraPoints | None:
    """The extra points the strategy gives ``node`` (checked against its weight), or None (none, or zero)."""
    data = getattr(choice, "multipoint", None)
    if data is None:
        return None
    if node.kind not in KINDS or (node.kind == "conv2d" and int(node.call.attrs.groups) != 1):
        raise QuantizeError(f"strategy gives {node.name} ({node.kind}) multipoint extra points, which only dense "
                            "and one-group conv2d layers take; re-run hago compile")
    rows = mp.to_rows(node.weight, node.kind)
    points = mp.ExtraPoints.from_json(data, rows.shape[0], rows.shape[1], choice.weight_bits)
    return points if len(points) else None


def widened(node, wq: np.ndarray, points: mp.ExtraPoints) -> np.ndarray:
    """The kernel's weight: ``wq`` (the node's layout) with one extra output channel per point appended."""
    rows = np.concatenate([mp.to_rows(wq, node.kind), points.codes.astype(wq.dtype)])
    return mp.from_rows(rows, node.kind, wq.shape)


def _levels(points: mp.ExtraPoints, out_channels: int, mult: np.ndarray, shift: np.ndarray):
    """Per level m: ``(idx [N], multiplier [N], shift [N])``; idx points at channel c's m-th extra point."""
    seen = np.zeros(out_channels, np.int64)
    levels = []
    for j, c in enumerate(points.channels):
        m = int(seen[c])
        seen[c] += 1
        if m == len(levels):
            levels.append((np.zeros(out_channels, np.int64), np.zeros(out_channels, np.int64),
                           np.ones(out_channels, np.int64)))
        idx, mul, sh = levels[m]
        idx[c], mul[c], sh[c] = j, int(mult[j]), int(shift[j])
    return levels


def emit_weighted_sum(bb: relax.BlockBuilder, acc: relax.Expr, node, points: mp.ExtraPoints,
                      main_scale: np.ndarray, out_channels: int) -> relax.Expr:
    """``acc`` (int32, ``N + E`` channels) -> int32 ``N`` channels with each extra point added to its source.

    (Module docstring: one gather, an int64 fixed-point rescale and an add per level.)
    """
    axis = len(bb.normalize(acc).ty.shape) - 1 if node.kind == "dense" else 1  # (strided_slice: no -1)
    bshape = (-1,) if node.kind == "dense" else (1, -1, 1, 1)
    n = out_channels
    main = bb.emit(O.strided_slice(acc, axes=[axis], begin=[0], end=[n]))
    mult, shift = mp.rescale(points, main_scale)
    for idx, mul, sh in _levels(points, n, mult, shift):
        g = bb.emit(O.take(acc, const(idx + n, "int64"), axis=axis, mode="clip"))
        p = bb.emit(O.multiply(O.astype(g, "int64"), const(mul.reshape(bshape), "int64")))
        half = const((np.int64(1) << (sh - 1)).reshape(bshape), "int64")
        mag = bb.emit(O.right_shift(O.add(O.abs(p), half), const(sh.reshape(bshape), "int64")))
        r = bb.emit(O.where(O.less(p, const(0, "int64")), O.negative(mag), mag))
        main = bb.emit(O.add(main, O.astype(r, "int32")))
    return main


def emit_float_sum(bb: relax.BlockBuilder, y: relax.Expr, node, points: mp.ExtraPoints,
                   out_channels: int) -> relax.Expr:
    """Float ``y`` (``N + E`` channels, each already in real units) -> ``N`` channels, extra points added.

    The dynamic dense's weighted sum (:mod:`.dynamic_dense`): its output is rescaled per row and column in
    float32, the extra columns with their own ``a_j``, so the sum is a gather and an add per level (a 0/1
    mask where a channel has no point at that level: exact, with or without a fused multiply-add).
    """
    axis = len(bb.normalize(y).ty.shape) - 1
    n, e = out_channels, len(points)
    main = bb.emit(O.strided_slice(y, axes=[axis], begin=[0], end=[n]))
    ones = np.ones(e, np.int64)
    for idx, mul, _ in _levels(points, n, ones, ones):
        g = bb.emit(O.take(y, const(idx + n, "int64"), axis=axis, mode="clip"))
        main = bb.emit(O.add(main, O.multiply(g, const(mul.astype(np.float32), "float32"))))
    return main


def simulated_weight(node, choice, input_scale: float | None) -> np.ndarray:
    """The float32 weight the twin gives ``node``: realize's point 1 plus the strategy's extra points, if any."""
    w = fake_quantized_weight(node, choice.weight_bits, input_scale)
    points = layer_points(node, choice)
    if points is None:
        return w
    rows = mp.to_rows(w, node.kind).astype(np.float64)
    np.add.at(rows, points.channels, points.codes.astype(np.float64) * points.scales.astype(np.float64)[:, None])
    return mp.from_rows(rows.astype(np.float32), node.kind, w.shape)
