"""Smoke test: the building blocks of real mobile networks go through hago at batch 1.

A small MobileNet/ResNet-style network (stem conv + ReLU6, depthwise conv + ReLU6,
pointwise projection, residual add, global average pool, linear classifier) is
quantized for x86 AVX-512 VNNI and compiled at batch 1; its INT8 build must be
truly integer where the spec allows and agree with FP32 on random inputs.
The full networks are measured by benchmarks/run.py.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tvm = pytest.importorskip("tvm")

from torch import nn  # noqa: E402


class MobileBlockNet(nn.Module):
    def __init__(self, c: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.dw(x))  # residual add with a depthwise branch
        return self.fc(torch.flatten(self.pool(x), 1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = MobileBlockNet()
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    with torch.no_grad():
        m.fc.weight.mul_(8.0)  # spread the logits so top-1 is a meaningful comparison
    return m.eval()


def test_mobile_block_compiles_at_batch1_and_agrees_with_fp32():
    from tvm import relax

    from hago.compiler import compile as hago_compile

    model = _model()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    res = hago_compile(model, "x86-avx512-vnni", {"x": calib}, example_inputs=(torch.zeros(1, 3, 32, 32),),
                       measure=False, batch_size=32)

    ops = res.strategy.ops
    ints = sorted(c.kind for c in ops.values() if c.mode == "integer")
    assert ints.count("conv2d") == 2, ints
    assert ints.count("depthwise_conv2d") == 1, ints
    assert ints.count("clip") == 2, ints  # ReLU6 as clip(0, 6) stays in the integer domain
    assert ints.count("add") == 1, ints  # the residual add: both inputs are integer
    assert ints.count("dense") == 1, ints
    # global average pooling (relax.mean) sums the codes in int32; the flatten after it keeps the codes
    assert ints.count("global_avg_pool2d") == 1 and ints.count("reshape") == 1, ints
    assert res.report["ops"]["integer"] == 9

    # the integer program really computes on integers: int8 weights and int32 accumulation
    text = res.realized.mod.script()
    assert "int8" in text and "int32" in text

    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    vf = relax.VirtualMachine(res.fp32_executable, tvm.cpu())
    vq = relax.VirtualMachine(res.int_executable, tvm.cpu())
    ref = np.concatenate([vf["main"](tvm.runtime.tensor(x[i:i + 1])).numpy() for i in range(len(x))])
    out = np.concatenate([vq["main"](tvm.runtime.tensor(x[i:i + 1])).numpy() for i in range(len(x))])
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ref, torch_out, rtol=1e-4, atol=1e-4)
    assert out.shape == ref.shape == (64, 10)
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    assert agree > 0.9, agree
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < 0.1, rel
