"""Fake quantizers with learnable clipping: what the QAT forward pass rounds weights and activations with.

Both follow SAQ's reference (zhuang-group/SAQ, ``quan_models/LIQ.py``): a
learnable clip value ``alpha``, a step ``alpha / n``, rounding with a
straight-through gradient, so ``alpha`` learns from the loss as in PACT/LSQ
(``d out / d alpha`` is ``(round(u) - u) / n`` inside the range, the level
``+-1`` outside it). Three changes, all for the integer build:

* weights are clipped **per output channel** (the reference: one clip per
  layer), because hago's kernels take per-channel weight scales for free;
* the step is computed once, in float32, and every value is written as
  ``code * step``. The code is an integer and the step is exactly the float32
  the export writes into the strategy, so the weight the forward pass uses is
  bit for bit ``integer * scale``, the product realize rebuilds;
* the weights are not standardized first (the reference divides each conv's
  weights by their std): an integer kernel multiplies the layer's own
  weights, and a per-channel clip learns their scale anyway.

**The weight grid.** The reference's ``k``-bit weight grid is
``alpha * (2 q / (2^k - 1) - 1)``, ``q = 0 .. 2^k - 1``: levels at the odd
multiples of half a step, **no zero level** (at 4 bits: +-1/15, +-3/15, ..,
+-15/15 of alpha). An integer kernel needs ``real = scale * code`` with an
integer code, so two grids are offered (``grid=``):

* ``"zero"`` (the default): hago's symmetric narrow-range grid,
  ``step * {-(2^(k-1) - 1) .. 2^(k-1) - 1}`` (15 levels at 4 bits, zero among
  them). The model is *trained on the grid the kernels run*, so nothing
  changes at export and the 4-bit weights are packed two per byte. The cost:
  one level fewer than the reference (15 against 16).
* ``"odd"``: the reference grid itself, exported without loss as the odd
  integers ``m = 2q - (2^k - 1)`` (``-15, -13, .., 15`` at 4 bits) with scale
  ``alpha / (2^k - 1)``: a ``k + 1``-bit symmetric code in an int8 container.
  The integer program is exact, but the layer is a 5-bit layer to hago (int8
  storage, no 4-bit packing), since ``-15..15`` does not fit a nibble. The
  other mapping, shifting the grid by half a step onto ``{-8..7}``, would make
  the codes fit a nibble but move every weight by ``alpha / 15`` and is not
  offered: it changes the function the training settled on.
"""

from __future__ import annotations

import torch
from torch import nn

GRIDS = ("zero", "odd")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even, as ``relax.op.quantize``) with the identity as its gradient.

    ``x + (round(x) - x)`` is exactly ``round(x)`` in float32 (Sterbenz: the
    difference of two floats within a factor of two is exact), so the value
    carried forward is the integer itself.
    """
    return x + (torch.round(x) - x).detach()


def weight_levels(bits: int, grid: str) -> int:
    """The largest integer code of a ``bits``-bit weight on ``grid`` (the code range is ``-n .. n``)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown weight grid {grid!r} (valid: {', '.join(GRIDS)})")
    return 2 ** (bits - 1) - 1 if grid == "zero" else 2 ** bits - 1


def export_bits(bits: int, grid: str) -> int:
    """The weight bits hago realizes a ``bits``-bit layer at: ``bits`` on the zero grid, ``bits + 1`` on the odd one."""
    return bits if grid == "zero" else bits + 1


def _mse_clip(x: torch.Tensor, quantize, amax: torch.Tensor, dims) -> torch.Tensor:
    """The fraction of ``amax`` (per entry of ``amax``) among 0.3 .. 1.0 that quantizes ``x`` with least MSE."""
    best, best_err = amax.clone(), None
    for frac in torch.linspace(0.3, 1.0, 15):
        alpha = (amax * frac).clamp_min(1e-8)
        err = (quantize(x, alpha) - x).pow(2).mean(dim=dims) if dims else (quantize(x, alpha) - x).pow(2).mean()
        if best_err is None:
            best_err = err
            best = alpha
        else:
            better = err < best_err
            best = torch.where(better, alpha, best)
            best_err = torch.where(better, err, best_err)
    return best


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight fake quantization with a learnable clip ``alpha`` per channel."""

    def __init__(self, channels: int, axis: int, bits: int, grid: str = "zero"):
        super().__init__()
        self.axis, self.bits, self.grid = axis, bits, grid
        self.levels = weight_levels(bits, grid)
        self.alpha = nn.Parameter(torch.ones(channels))

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[self.axis] = -1
        return t.reshape(shape)

    def step(self) -> torch.Tensor:
        """The per-channel float32 step ``|alpha| / n``: the scale the export writes."""
        return self.alpha.abs().clamp_min(1e-8) / self.levels

    def codes(self, w: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """The integer codes (as float, straight-through gradient) of ``w`` on this quantizer's grid."""
        a = self.alpha.abs().clamp_min(1e-8) if alpha is None else alpha
        n = self.levels
        if self.grid == "zero":
            return torch.clamp(round_ste(w / self._view(a / n, w.ndim)), -n, n)
        u = torch.clamp(w / self._view(a, w.ndim), -1.0, 1.0)
        return 2.0 * round_ste((u + 1.0) / 2.0 * n) - n  # odd integers -n .. n: the reference grid

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.codes(w) * self._view(self.step(), w.ndim)

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """``alpha`` per channel: the clip among 0.3-1.0 of max |w| with the least rounding MSE."""
        dims = tuple(i for i in range(w.ndim) if i != self.axis)
        amax = w.abs().amax(dim=dims)

        def fq(x, alpha):
            return self.codes(x, alpha) * self._view(alpha / self.levels, x.ndim)

        self.alpha.copy_(_mse_clip(w, fq, amax, dims))  # alpha flat [C]: codes() views it along the axis


class ActivationQuantizer(nn.Module):
    """Per-tensor activation fake quantization with a learnable range, on hago's uint8 activation grid.

    ``unsigned`` (inputs that are never negative, after a ReLU): ``[0, alpha]``
    in ``2^bits - 1`` steps, zero point 0, the reference's activation
    quantizer. ``affine`` (a signed input, e.g. the normalized image): a
    learnable ``[lo, hi]`` with hago's zero-point convention
    (:func:`hago.qparams.activation_qparams`): ``zp = round(-lo / step)``,
    ``x_q = step * (clip(round(x / step) + zp, 0, n) - zp)``, the zero point
    held fixed in the gradient. The mode is chosen from the calibration batch.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.levels = 2 ** bits - 1
        self.signed = False
        self.lo = nn.Parameter(torch.zeros(()))
        self.hi = nn.Parameter(torch.ones(()))

    def step(self) -> torch.Tensor:
        """The float32 step: the scale the export writes into the strategy's edge."""
        span = (self.hi - self.lo) if self.signed else self.hi
        return span.abs().clamp_min(1e-8) / self.levels

    def zero_point(self) -> torch.Tensor:
        if not self.signed:
            return torch.zeros(())
        return torch.clamp(torch.round(-self.lo.detach() / self.step().detach()), 0, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, zp = self.step(), self.zero_point()
        return (torch.clamp(round_ste(x / s) + zp, 0, self.levels) - zp) * s

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Signed or not from the batch; the range: min/max (signed), or the MSE-best clip of max (unsigned)."""
        self.signed = bool(x.min() < 0)
        if self.signed:
            self.lo.fill_(float(x.min()))
            self.hi.fill_(float(x.max()))
            return
        self.lo.fill_(0.0)

        def fq(v, alpha):
            s = alpha / self.levels
            return torch.clamp(torch.round(v / s), 0, self.levels) * s

        self.hi.copy_(_mse_clip(x, fq, x.max().clamp_min(1e-8), None))
