"""Data-free methods (Nagel et al. 2019): cross-layer equalization (``cle``) and analytic bias correction
(``bias_data_free``) on real numbers.

* CLE leaves the FP32 network's output unchanged (1e-5 relative, compiled with TVM) and makes the
  per-channel weight ranges of each equalized pair equal, for conv-relu-conv-relu-flatten-linear and a
  depthwise -> pointwise pair; the folded batch norm's statistics follow the scaling;
* ``bias_data_free`` removes most of the mean output shift 4-bit weights put on a conv fed by
  conv-BN-ReLU, from the batch norm's statistics only, measured on data it never saw;
* end to end through ``hago.compiler.quantize`` (and a strategy replay), and the CLI help lists both.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from bn_nets import bn_net
from hago.annotate import AnnotateConfig
from hago.compiler import quantize
from hago.correct import CORRECTIONS, CorrectionContext, get_correction
from hago.correct.cle import find_pairs, in_ranges, out_ranges
from hago.pipeline import apply_graph_corrections, prepare_model
from hago.realize.quant import fake_quantized_weight

pytestmark = pytest.mark.llvm
DEVICE = "x86-avx512-vnni"


def _spread(layer: nn.Module, seed: int) -> None:
    """Output channel ranges over ~3 decades, so equalization has something to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        f = 10.0 ** (torch.rand(layer.weight.shape[0], generator=g) * 3 - 1.5)
        layer.weight.mul_(f.view(-1, *[1] * (layer.weight.dim() - 1)))
        if layer.bias is not None:
            layer.bias.mul_(f)


def _plain_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12 * 3 * 3, 5))
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.01, 3.0), bn.bias.uniform_(-0.5, 0.5)
    _spread(net[3], 1)
    return net.eval()


def _dw_net() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                        nn.Conv2d(16, 6, 1))
    _spread(net[2], 2)
    return net.eval()


def _cle(net, shape, run_tvm, seed):
    x = np.random.default_rng(seed).standard_normal((16, *shape)).astype(np.float32)
    before = prepare_model(net, example_inputs=(torch.from_numpy(x[:2]),))
    after = apply_graph_corrections(before, ["cle"])
    ref, out = run_tvm(before.fp32, x), run_tvm(after.fp32, x)
    with torch.no_grad():
        np.testing.assert_allclose(ref, net(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)
    return before, after, ref, out


def _pair_ranges(graph):
    pairs, _ = find_pairs(graph)
    return [(p, out_ranges(p.first, p.first.weight.astype(np.float64)),
             in_ranges(p.second, p.second.weight.astype(np.float64), len(out_ranges(p.first, p.first.weight)),
                       p.repeat)) for p in pairs]


@pytest.mark.parametrize("which", ["plain", "depthwise"])
def test_cle_keeps_fp32_output_and_equalizes_ranges(which, run_tvm):
    net, shape = (_plain_net(), (3, 8, 8)) if which == "plain" else (_dw_net(), (3, 8, 8))
    before, after, ref, out = _cle(net, shape, run_tvm, 3)
    # the FP32 function is the same (float rounding of the rescaled weights only)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(out - ref).max() / np.abs(ref).max()
    assert after.graph_hash != before.graph_hash and after.rewrites == ("cle",)
    old = {p.first.name: (r1, r2) for p, r1, r2 in _pair_ranges(before.graph)}
    new = _pair_ranges(after.graph)
    want = 2  # conv->conv, conv->linear (through max pool and flatten) / conv->dw, dw->pw
    assert len(new) == want == len(old), [p.first.name for p, *_ in new]
    for p, r1, r2 in new:
        np.testing.assert_allclose(r1, r2, rtol=1e-4)  # both sides of every channel: one range
        o1, o2 = old[p.first.name]
        assert np.max(np.maximum(o1, o2) / np.minimum(o1, o2)) > 2  # they were not equal before
    if which == "depthwise":  # the depthwise layer's channel ranges were 3 decades apart; no longer
        dw = [n for n in after.graph.nodes if n.kind == "depthwise_conv2d"][0]
        dw0 = [n for n in before.graph.nodes if n.kind == "depthwise_conv2d"][0]
        spread = lambda n: out_ranges(n, n.weight).max() / out_ranges(n, n.weight).min()  # noqa: E731
        assert spread(dw) < spread(dw0) / 10, (spread(dw), spread(dw0))
    else:  # the folded batch norm's output statistics are scaled with the first layer's output channels
        b, a = before.graph.nodes[0], after.graph.nodes[0]
        assert b.bn_stats is not None and a.bn_stats is not None
        s = out_ranges(b, b.weight) / out_ranges(a, a.weight)
        assert np.abs(np.log(s)).max() > 0.1
        np.testing.assert_allclose(a.bn_stats[0], b.bn_stats[0] / s, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(a.bn_stats[1], b.bn_stats[1] / s, rtol=1e-4)
    # applying it again changes nothing: a replayed strategy gets the same graph
    assert apply_graph_corrections(after, ["cle", "bias"]) is after


def test_cle_skips_relu6_pairs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    prepared = prepare_model(net, example_inputs=(torch.zeros(2, 3, 4, 4),))
    mod, report = get_correction("cle").rewrite(prepared.fp32)
    assert report["pairs"] == 0 and report["skipped_clip"] == 1 and mod is prepared.fp32


# -- data-free bias correction ---------------------------------------------------------------------
def test_bias_data_free_removes_the_mean_shift_of_4bit_weights():
    rng = np.random.default_rng(0)
    stats_x = rng.standard_normal((512, 3, 12, 12)).astype(np.float32)  # what "training" saw: only in the BN
    calib = rng.standard_normal((64, 3, 12, 12)).astype(np.float32)
    test = rng.standard_normal((512, 3, 12, 12)).astype(np.float32)  # data the correction never sees
    net = bn_net(stats_x)
    q = quantize(net, DEVICE, calib, example_inputs=(torch.from_numpy(calib[:2]),),
                 annotate_config=AnnotateConfig(weight_bits=4), corrections=["bias_data_free"])
    second = [n for n in q.graph.nodes if n.kind == "conv2d"][1]
    op = q.strategy.ops[second.name]
    assert op.mode == "integer" and op.weight_bits == 4 and op.bias_delta is not None
    assert q.strategy.corrections == ["bias_data_free"]
    # the second layer on real data: FP32 weights vs the 4-bit weights realize uses, with and without the delta
    in_scale = float(np.asarray(q.strategy.resolved(second.inputs[0]).qparams.scale).ravel()[0])
    wq = torch.from_numpy(fake_quantized_weight(second, 4, in_scale))
    with torch.no_grad():
        h = net[2](net[1](net[0](torch.from_numpy(test))))
        ref = net[3](h)
        plain = nn.functional.conv2d(h, wq, net[3].bias)
        fixed = plain + torch.tensor(op.bias_delta).view(1, -1, 1, 1)
    err = lambda y: float((y - ref).mean((0, 2, 3)).abs().mean())  # noqa: E731 - mean per-channel output error
    e_plain, e_fixed = err(plain), err(fixed)
    assert e_plain > 0.01 * float(ref.std()), e_plain  # 4-bit rounding does shift the means
    assert e_fixed < 0.05 * e_plain, (e_fixed, e_plain)  # measured: 0.032 -> 0.0001 (300x)


def test_bias_data_free_without_batch_norm_says_so(caplog):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    calib = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="hago.correct.bias_data_free"):
        q = quantize(net, DEVICE, calib, example_inputs=(torch.from_numpy(calib[:2]),),
                     corrections=["bias_data_free"])
    assert any("no batch-norm statistics" in r.getMessage() for r in caplog.records)
    assert all(op.bias_delta is None for op in q.strategy.ops.values())


# -- end to end --------------------------------------------------------------------------------------
def test_quantize_with_cle_and_data_free_bias_and_replay(tmp_path, run_tvm):
    rng = np.random.default_rng(1)
    net = _plain_net()
    calib, test = (rng.standard_normal((n, 3, 8, 8)).astype(np.float32) for n in (64, 64))
    example = (torch.from_numpy(calib[:2]),)
    q = quantize(net, DEVICE, calib, example_inputs=example, corrections=["bias_data_free", "cle", "bias"])
    assert q.strategy.corrections == ["cle", "bias_data_free", "bias"]  # the graph correction ran first
    assert any(n.startswith("cle: pairs 2") for n in q.notes), q.notes
    with torch.no_grad():
        ref = net(torch.from_numpy(test)).numpy()
    out = run_tvm(q.realized.mod, test)
    assert np.abs(out - ref).mean() < 0.05 * np.abs(ref).mean()
    q.strategy.save(tmp_path / "s.json")
    replay = quantize(net, DEVICE, strategy=tmp_path / "s.json", example_inputs=example)
    assert replay.graph_hash == q.graph_hash  # cle re-applied, deterministically
    np.testing.assert_array_equal(run_tvm(replay.realized.mod, test), out)


def test_registered_and_listed_in_cli_help():
    from hago.cli import build_parser

    assert {"cle", "bias_data_free"} <= set(CORRECTIONS)
    assert CORRECTIONS["cle"].stage == "graph" and CORRECTIONS["bias_data_free"].stage == "strategy"
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for cmd in ("compile", "search"):
        text = sub[cmd].format_help()
        assert "cle" in text and "bias_data_free" in text, cmd
    with pytest.raises(Exception, match="rewrites the FP32 graph"):  # never after calibration
        get_correction("cle").run(CorrectionContext(None, None, None, None, None))
