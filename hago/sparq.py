"""SPARQ (Shomron et al., arXiv 2105.11010): 8-bit activations trimmed to a 4-bit window, simulated.

SPARQ's datapath multiplies 4-bit activation windows by 8-bit weights.
gilshm/sparq's reference (``QuantConv2d.py``, its CUDA simulation) works on
*unsigned* 8-bit activation codes (it refuses signed ones) and 8-bit
symmetric per-filter weights:

* **bSPARQ** keeps, of each uint8 code, the 4-bit window that holds its
  leading one. The hardware offers a few window positions (``options``):
  5 (masks 0xF0, 0x78, 0x3C, 0x1E, 0x0F), 3 (bits 7-4, 5-2, 3-0) or 2 (the
  high or the low nibble). The window chosen is the lowest offered one that
  still holds the leading one, so as many low bits as possible survive.
  ``rounding: round`` adds the bit just below the window and clamps the
  window at 15 on overflow; ``raw`` truncates.
* **vSPARQ** pairs adjacent input channels (2c, 2c+1) that meet the same
  weight tap: when one of a pair is 0, the other takes both 4-bit lanes and
  keeps all 8 bits; otherwise each is trimmed as bSPARQ trims it.

hago applies it to the uint8 codes of every integer conv/dense input whose
zero point is 0 (truly unsigned values, what the reference accepts; an
offset-coded edge such as a normalized image stays 8-bit, as SPARQ keeps the
first layer). The pairs are taken on the layer's input tensor, which is the
same as at each kernel tap because a tap reads the same pixel for every
channel: a conv's NCHW input pairs along C at each (n, h, w); a dense input
``[..., K]`` pairs along K for each row. An odd last channel has no partner,
so it counts as paired with a 0 and keeps its 8 bits.

:func:`trim` is the numpy reference; :func:`emit_trim` emits the same integer
arithmetic in Relax, used by realize on the codes and by simulate on the
codes of its fake-quantized input, so the two programs still agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: window shifts (lowest kept bit) each option set offers, ascending
WINDOW_SHIFTS = {5: (0, 1, 2, 3, 4), 3: (0, 2, 4), 2: (0, 4)}
#: the integer layers whose activation input SPARQ trims
SPARQ_KINDS = ("conv2d", "depthwise_conv2d", "dense")


@dataclass(frozen=True)
class SparqConfig:
    """The spec's ``sparq:`` block: which variant, how many window positions, how the window rounds."""

    mode: str = "bsparq"  # bsparq | vsparq
    options: int = 5  # 5 | 3 | 2
    rounding: str = "round"  # round | raw

    @classmethod
    def of(cls, d) -> "SparqConfig":
        return d if isinstance(d, cls) else cls(**dict(d))


# -- numpy reference ------------------------------------------------------------
def window_shift(x: np.ndarray, options: int) -> np.ndarray:
    """The lowest kept bit of each uint8 code: the lowest offered window that holds its leading one."""
    x = np.asarray(x).astype(np.int32)
    shifts = WINDOW_SHIFTS[options]
    s = np.full(x.shape, shifts[0], np.int32)
    for lower, s_i in zip(shifts, shifts[1:]):
        s = np.where(x >= (1 << (lower + 4)), s_i, s)  # the leading one is above the lower window
    return s


def bsparq(x: np.ndarray, options: int = 5, rounding: str = "round") -> np.ndarray:
    """Each uint8 code kept to its 4-bit window (bSPARQ), as uint8."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"SPARQ trims unsigned 8-bit codes, got {x.dtype}")
    xi = x.astype(np.int32)
    s = window_shift(xi, options)
    t = xi >> s
    if rounding == "round":
        t = np.minimum(t + (((xi << 1) >> s) & 1), 15)  # bit s-1 (0 when s == 0); clamp on overflow
    elif rounding != "raw":
        raise ValueError(f"rounding must be round or raw, got {rounding!r}")
    return (t << s).astype(np.uint8)


def pair_both_nonzero(x: np.ndarray, axis: int) -> np.ndarray:
    """True where a code and its pair partner along ``axis`` (2c, 2c+1) are both nonzero; odd last: False."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    c = x.shape[-1]
    nz = x != 0
    both = np.zeros(x.shape, bool)
    even, odd = nz[..., 0:c - 1:2], nz[..., 1:c:2]
    both[..., :c - c % 2] = np.repeat(even & odd, 2, axis=-1)
    return np.moveaxis(both, -1, axis)


def vsparq(x: np.ndarray, axis: int, options: int = 5, rounding: str = "round") -> np.ndarray:
    """vSPARQ: codes whose pair partner is 0 keep 8 bits, the others their bSPARQ window."""
    return np.where(pair_both_nonzero(x, axis), bsparq(x, options, rounding), x).astype(np.uint8)


def trim(x: np.ndarray, config, axis: int = 1) -> np.ndarray:
    """SPARQ per ``config`` on uint8 codes; ``axis`` is the channel axis vSPARQ pairs along."""
    cfg = SparqConfig.of(config)
    if cfg.mode == "vsparq":
        return vsparq(x, axis, cfg.options, cfg.rounding)
    return bsparq(x, cfg.options, cfg.rounding)


# -- Relax ------------------------------------------------------------------------
def emit_trim(bb, q, config, axis: int = 1):
    """Emit :func:`trim` of the uint8 tensor ``q`` into ``bb``; returns the uint8 result (same shape)."""
    from tvm import relax
    from tvm.relax import op as O

    cfg = SparqConfig.of(config)

    def c(v):
        return relax.const(np.int32(v), "int32")

    xi = bb.emit(O.astype(q, "int32"))
    shifts = WINDOW_SHIFTS[cfg.options]
    s = c(shifts[0])
    for lower, s_i in zip(shifts, shifts[1:]):
        s = bb.emit(O.where(O.greater_equal(xi, c(1 << (lower + 4))), c(s_i), s))
    t = O.right_shift(xi, s)
    if cfg.rounding == "round":
        t = O.minimum(O.add(t, O.bitwise_and(O.right_shift(O.left_shift(xi, c(1)), s), c(1))), c(15))
    kept = bb.emit(O.astype(O.left_shift(bb.emit(t), s), "uint8"))
    if cfg.mode != "vsparq":
        return kept
    return bb.emit(O.where(_emit_pair_mask(bb, q, axis), kept, q))


def _emit_pair_mask(bb, q, axis: int):
    """Relax :func:`pair_both_nonzero` (works with a symbolic batch: only the channel axis must be static)."""
    from tvm.relax import op as O

    ndim = len(q.ty.shape)
    axis = axis % ndim
    channels = int(q.ty.shape[axis])
    full = channels - channels % 2
    nz = bb.emit(O.not_equal(q, O.zeros_like(q)))
    even = bb.emit(O.strided_slice(nz, [axis], [0], [full], [2]))
    odd = bb.emit(O.strided_slice(nz, [axis], [1], [full], [2]))
    both = bb.emit(O.repeat(O.logical_and(even, odd), 2, axis=axis))
    if full == channels:
        return both
    last = bb.emit(O.strided_slice(nz, [axis], [full], [channels]))
    return bb.emit(O.concat([both, O.logical_and(last, O.logical_not(last))], axis=axis))  # unpaired: keep 8 bits


# -- where it applies ---------------------------------------------------------------
def channel_axis(node) -> int:
    """The axis vSPARQ pairs along: C of a conv's NCHW input, K (the last) of a dense input."""
    return -1 if node.kind == "dense" else 1


def applies(strategy, node, qp) -> bool:
    """Whether SPARQ trims ``node``'s input: a SPARQ strategy, a conv/dense, unsigned uint8 codes (zero point 0)."""
    return (getattr(strategy, "sparq", None) is not None and node.kind in SPARQ_KINDS and qp is not None
            and qp.dtype == "uint8" and int(qp.zero_point) == 0)


def realized_input(bb, node, strategy, xq, qp):
    """Realize's integer input of ``node``: ``xq`` trimmed when SPARQ applies, else ``xq`` itself."""
    if not applies(strategy, node, qp):
        return xq
    return emit_trim(bb, xq, strategy.sparq, channel_axis(node))


def simulated_call(bb, node, call, strategy, subst):
    """Simulate's ``call`` with its (fake-quantized float) input re-coded, trimmed and dequantized.

    Quantizing a value that is already ``dequantize(q)`` gives ``q`` back
    exactly, so the trimming sees the very codes realize trims.
    """
    from tvm import relax

    from .realize.quant import dequantize, quantize

    if node.kind not in SPARQ_KINDS or getattr(strategy, "sparq", None) is None:
        return call
    qp = strategy.resolved(node.inputs[0]).qparams
    if not applies(strategy, node, qp) or strategy.resolved(node.inputs[0]).dynamic:
        return call
    q = bb.emit(quantize(subst(call.args[0]), qp))
    x = bb.emit(dequantize(emit_trim(bb, q, strategy.sparq, channel_axis(node)), qp))
    return relax.Call(call.op, [x, *call.args[1:]], call.attrs, call.ty_args)
