"""Small batch-norm networks for the data-free corrections' tests: BN statistics set from data the method never sees."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def fit_bn_stats(conv: nn.Module, bn: nn.BatchNorm2d, x: np.ndarray) -> None:
    """``bn``'s running statistics those of ``conv``'s output on ``x``; its affine parameters random but fixed."""
    with torch.no_grad():
        y = conv(torch.from_numpy(x))
        bn.running_mean.copy_(y.mean((0, 2, 3)))
        bn.running_var.copy_(y.var((0, 2, 3)))
        bn.weight.uniform_(0.3, 1.5)
        bn.bias.uniform_(-0.6, 0.8)


def bn_net(x: np.ndarray) -> nn.Module:
    """conv -> BN -> ReLU -> conv, the BN's running statistics those of the first conv on ``x``'s distribution."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3))
    fit_bn_stats(net[0], net[1], x)
    return net.eval()
