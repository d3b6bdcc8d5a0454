"""``hago.compile(..., corrections=("multipoint",))`` end to end, and its strategy.json replay.

A small MLP with heavy-tailed 4-bit weights on real MNIST pixels is built for
the host spec; the strategy it writes holds the extra points as JSON and,
loaded again, realizes the same integer program: same outputs, bit for bit,
as the build ``compile`` made. ``hago compile --help`` names the plug-in.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from hago import multipoint as mp
from hago.annotate import AnnotateConfig
from hago.cli import build_parser
from hago.compiler import compile as hago_compile
from hago.compiler import quantize
from hago.strategy import Strategy

pytestmark = pytest.mark.llvm
DEVICE = "x86-avx512-vnni"
BATCH = 8


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(49, 40), nn.ReLU(), nn.Linear(40, 10)).eval()
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.copy_(torch.distributions.StudentT(2.0).sample(layer.weight.shape) * 0.05)
    return net


def test_compile_with_multipoint_builds_and_its_strategy_replays_bit_for_bit(mnist_test, tmp_path, run_tvm):
    x = np.ascontiguousarray(mnist_test[0][:136, 0, ::4, ::4].reshape(136, 49))
    calib, test = x[:128], x[128:]
    net = _mlp()
    example = (torch.from_numpy(test),)
    res = hago_compile(net, DEVICE, {"input": calib}, example_inputs=example, out_dir=tmp_path, measure=False,
                       annotate_config=AnnotateConfig(weight_bits=4), corrections=("multipoint",), batch=BATCH)
    saved = json.loads((tmp_path / "strategy.json").read_text())
    assert saved["corrections"] == ["multipoint"]
    points = {name: op["multipoint"] for name, op in saved["ops"].items() if "multipoint" in op}
    assert len(points) == 2  # both dense layers: 4 of 40 and 1 of 10 channels more (the 10% budget)
    assert sorted(len(p["channels"]) for p in points.values()) == [1, 4]
    built = relax.VirtualMachine(res.int_executable, tvm.cpu())["main"](tvm.runtime.tensor(test)).numpy()
    replay = quantize(net, DEVICE, strategy=Strategy.load(tmp_path / "strategy.json"), example_inputs=example)
    assert {n: op.multipoint for n, op in replay.strategy.ops.items() if op.multipoint} == points
    np.testing.assert_array_equal(run_tvm(replay.realized.mod, test), built)
    with torch.no_grad():
        ref = net(torch.from_numpy(test)).numpy()
    rel = float(np.sqrt(((built - ref) ** 2).mean() / (ref ** 2).mean()))
    assert rel < 0.3  # and it still computes the MLP (4-bit weights: measured 0.18)
    first = next(n for n in replay.graph.nodes if n.name in points)
    assert mp.ExtraPoints.from_json(points[first.name], 40, 49, 4).codes.shape == (4, 49)


def test_compile_help_lists_multipoint():
    sub = next(a for a in build_parser()._subparsers._group_actions if a.choices and "compile" in a.choices)
    assert "multipoint" in sub.choices["compile"].format_help()
