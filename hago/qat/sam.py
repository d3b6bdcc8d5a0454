"""SAQ's training step: sharpness-aware minimization on the *quantized* weights (Liu, Cai, Zhuang, arXiv 2111.12273).

SAM (Foret et al.) minimizes the loss at the worst nearby point,
``w + eps`` with ``eps = rho * g / ||g||``. In a quantized network there are
three places for ``eps``; the paper's case (iii), and the only optimizer the
reference scripts run (``utils/qsam.py``: ``QSAM``), puts it on the quantized
weight:

1. forward and backward at ``Q(w)``; ``g`` is the gradient with respect to
   ``Q(w)`` itself (retained on each layer's ``qweight``), plus the biases';
2. ``eps = rho * g / ||g||`` over all of them together; each layer adds its
   ``eps`` to ``Q(w)`` (``QuantLayer.epsilon``), each bias gets its share;
3. forward and backward at ``Q(w) + eps``: the straight-through estimator
   carries that gradient to the latent weights and the clip values;
4. the biases are restored, ``eps`` is dropped, and the base optimizer steps.

Perturbing the latent ``w`` instead (case (i)) would lose every ``eps``
smaller than half a step to rounding: at 4 bits, nearly all of it. One
departure: the reference standardizes each conv's weights (zero mean, unit
std) before quantizing, so its ``rho = 0.3`` is relative to unit-scale
weights; hago keeps each layer's own scale (the integer program has no
standardization step), so the default radius is smaller
(:class:`hago.qat.train.TrainConfig`). The clip
values are not perturbed (the reference's defaults ``include_wclip`` and
``include_aclip`` are off), and neither is a layer outside the quantized ones.
"""

from __future__ import annotations

from typing import Callable

import torch

from .layers import quant_layers


class SAQ:
    """Wraps a base optimizer: :meth:`step` does one SAQ update (two forward/backward passes)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rho: float = 0.3):
        if rho <= 0:
            raise ValueError(f"rho must be positive, got {rho}")
        self.model, self.optimizer, self.rho = model, optimizer, rho

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One update; ``loss_fn()`` runs the model on the batch and returns the loss. Returns the first loss."""
        layers = quant_layers(self.model)
        self.optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads = [(m.qweight.grad, m) for m in layers]
        biases = [m.inner.bias for m in layers if m.inner.bias is not None and m.inner.bias.grad is not None]
        norms = [g.norm(2) for g, _ in grads] + [b.grad.norm(2) for b in biases]
        scale = self.rho / (torch.stack(norms).norm(2) + 1e-12)
        with torch.no_grad():
            for g, m in grads:
                m.epsilon = (g * scale).detach()
            saved = [b.detach().clone() for b in biases]
            for b in biases:
                b.add_(b.grad * scale)
        self.optimizer.zero_grad()
        try:
            loss_fn().backward()
        finally:
            with torch.no_grad():
                for b, old in zip(biases, saved):
                    b.copy_(old)
            for m in layers:
                m.epsilon = None
        self.optimizer.step()
        return loss.detach()


class PlainQAT:
    """The baseline beside SAQ: the same fake-quantized model, one forward/backward per update."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        self.optimizer.step()
        return loss.detach()
