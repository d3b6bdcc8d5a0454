"""A residual model exports through hago.qat: the add's edges, which no trained layer reads, are calibrated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hago import zoo
from hago.compiler import quantize as hago_quantize
from hago.errors import QuantizeError
from hago.qat import QuantConfig, TrainConfig, export, logits_of, quantize_model, train

pytestmark = [pytest.mark.llvm]


class Residual(nn.Module):
    """conv -> relu -> (conv -> relu) + skip -> linear: the add's inputs and output are no layer's input range."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.conv(y)) + y
        return self.head(torch.flatten(y, 1))


def test_residual_model_exports_with_calibrated_add_edges_and_replays(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = zoo.mnist_data("train")
    x, y = x[:4000], y[:4000]
    model = quantize_model(Residual().eval(), torch.from_numpy(x[:256]),
                           QuantConfig(weight_bits=4, act_bits=8, input_bits=8))
    train(model, x, y, TrainConfig(method="qat", steps=60, batch=64, lr=0.05, seed=0))
    example = torch.from_numpy(x[:1])
    with pytest.raises(QuantizeError, match="no trained layer reads it .*pass calibration inputs") as err:
        export(model, example, tmp_path / "nocalib", "x86-avx512-vnni")
    assert "\n" not in str(err.value)

    onnx_path, strategy_path = export(model, example, tmp_path / "out", "x86-avx512-vnni", calib=x[:256])
    q = hago_quantize(str(onnx_path), "x86-avx512-vnni", strategy=strategy_path)
    assert {op.mode for op in q.strategy.ops.values() if op.kind in ("conv2d", "dense")} == {"integer"}
    xt, yt = zoo.mnist_data("test")
    xt, yt = xt[:500], yt[:500]
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(q.realized.mod, target="llvm"), tvm.cpu())
    out = np.concatenate([vm["main"](tvm.runtime.tensor(xt[i:i + 250])).numpy() for i in range(0, 500, 250)])
    fake = logits_of(model, xt)
    # the add is quantized by hago and not by the training: close, not bit-exact
    assert (out.argmax(1) == fake.argmax(1)).mean() >= 0.97
    assert (out.argmax(1) == yt).mean() >= 0.85
