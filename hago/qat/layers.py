"""Conv2d / Linear layers with fake-quantized inputs and weights, and the model rewrite that installs them.

A :class:`QuantLayer` wraps the float layer it replaces, so the float weight
stays the latent parameter the optimizer updates. It keeps the quantized
weight of its last forward pass (``qweight``, gradient retained) and takes a
perturbation ``epsilon`` that is added to that quantized weight: SAQ's case
(iii) (:mod:`hago.qat.sam`) reads the gradient at ``Q(w)`` and adds its
perturbation to ``Q(w)``, never to the latent ``w``, where rounding would
swallow most of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActivationQuantizer, WeightQuantizer, round_ste


@dataclass(frozen=True)
class QuantConfig:
    """Bits per layer: ``weight_bits`` / ``act_bits`` everywhere, the model's own input at ``input_bits``.

    The input (a normalized image) is signed and feeds the first layer; it
    gets 8 bits, as the literature keeps its first layer's input (and hago's
    spec takes 8-bit activations there). ``grid`` is the weight grid
    (:mod:`hago.qat.quantizers`).
    """

    weight_bits: int = 4
    act_bits: int = 4
    input_bits: int = 8
    grid: str = "zero"


class QuantLayer(nn.Module):
    """A conv2d or linear layer whose input and weight are fake-quantized."""

    def __init__(self, inner: nn.Module, weight_bits: int, act_bits: int, grid: str):
        super().__init__()
        if not isinstance(inner, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, not {type(inner).__name__}")
        self.inner = inner
        self.weight_q = WeightQuantizer(inner.weight.shape[0], 0, weight_bits, grid)  # O of OIHW and of [N, K]
        self.input_q = ActivationQuantizer(act_bits)
        self.epsilon: torch.Tensor | None = None  # SAQ's perturbation of the quantized weight
        self.qweight: torch.Tensor | None = None  # Q(w) of the last forward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.input_q(x)
        w = self.weight_q(self.inner.weight)
        if w.requires_grad:
            w.retain_grad()
        self.qweight = w
        if self.epsilon is not None:
            w = w + self.epsilon
        m, b = self.inner, self.quantized_bias()
        if isinstance(m, nn.Linear):
            return F.linear(xq, w, b)
        return F.conv2d(xq, w, b, m.stride, m.padding, m.dilation, m.groups)

    def accumulator_scale(self) -> torch.Tensor:
        """``s_x * s_w`` per output channel: one unit of the integer layer's int32 accumulator."""
        return (self.input_q.step() * self.weight_q.step()).detach()

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias on the accumulator's grid, ``round(b / (s_x s_w)) * s_x s_w``, as realize stores it in int32.

        With it, the layer's float output is the integer accumulator times its
        scale, up to float32 rounding, so the next quantizer rounds the same
        values the integer program requantizes (a code differs only where a
        value sits within float32 noise of a rounding boundary).
        """
        b = self.inner.bias
        if b is None:
            return None
        acc = self.accumulator_scale()
        return round_ste(b / acc) * acc

    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, step)``: the trained integer weight (int32, the float layout) and its per-channel scale."""
        codes = self.weight_q.codes(self.inner.weight)
        return codes.round().to(torch.int32), self.weight_q.step().detach().clone()


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    """The model's quantized layers, in registration order (the order its forward runs them, for a chain)."""
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


def quantize_model(model: nn.Module, calib_x: torch.Tensor, config: QuantConfig = QuantConfig()) -> nn.Module:
    """``model`` with every Conv2d / Linear wrapped in a :class:`QuantLayer`, clips set from ``calib_x``.

    Rewrites ``model`` in place and returns it. Each layer's weight clip starts
    at the per-channel MSE-best fraction of its max; each input's range at
    what one pass over ``calib_x`` (FP32, before any wrapping) shows.
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, (nn.Conv2d, nn.Linear)) and not isinstance(parent, QuantLayer)]
    if not targets:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    inputs: dict[int, torch.Tensor] = {}
    def record(module, args):
        inputs.setdefault(id(module), args[0].detach())  # returns None: the input itself is left alone

    hooks = [child.register_forward_pre_hook(record) for _, _, child in targets]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(calib_x)
    for h in hooks:
        h.remove()
    for parent, name, child in targets:
        if id(child) not in inputs:
            raise ValueError(f"layer {name} did not run on the calibration batch")
        x = inputs[id(child)]
        graph_input = x.data_ptr() == calib_x.data_ptr()
        layer = QuantLayer(child, config.weight_bits, config.input_bits if graph_input else config.act_bits,
                           config.grid)
        layer.weight_q.init_from(child.weight.detach())
        layer.input_q.init_from(x)
        setattr(parent, name, layer)
    model.train(was_training)
    return model
