"""DF-MPC (``dfmpc``, :mod:`hago.correct.dfmpc`) on real numbers.

* the Gaussian model's moments (a truncated bivariate normal, by quadrature) agree with Monte Carlo;
* on conv-BN-ReLU-conv with the first conv at 2 or 3 bits and the second at 8, the closed form, from the
  BN statistics only, lowers the second layer's output error on data it never saw, reaches nearly all of
  what the best per-channel scale + bias fitted *on that data* reaches, and beats the norm-ratio form;
* the compensation is stored in the strategy (``weight_scale_in``, ``bias_delta``), round-trips through
  JSON and a replay realizes the same program; the realized program's error drops too;
* no low-bit -> high-bit pair: one log line, the strategy unchanged;
* ``scale_input_channels`` is exact for grouped convs and dense layers, bad values are refused.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from bn_nets import bn_net, fit_bn_stats
from hago.annotate import AnnotateConfig
from hago.compiler import quantize
from hago.correct import CORRECTIONS, CorrectionContext, corrected_graph, get_correction
from hago.correct.base import scale_input_channels
from hago.correct.dfmpc import compensation, pair_moments
from hago.errors import QuantizeError
from hago.pipeline import prepare_model
from hago.realize.quant import fake_quantized_weight
from hago.strategy import Strategy

pytestmark = pytest.mark.llvm
DEVICE = "x86-avx512-vnni"
F = nn.functional


def test_moments_match_monte_carlo():
    rng = np.random.default_rng(0)
    mu, sigma = np.array([0.4, -0.3, 1.2, 0.0]), np.array([0.8, 0.5, 0.3, 1.0])
    slope, offset = np.array([0.9, 1.1, 0.8, 1.0]), np.array([0.05, -0.1, 0.2, 0.0])
    nmean, nstd = np.array([0.02, 0.0, -0.05, 0.1]), np.array([0.2, 0.1, 0.4, 0.0])
    mom = pair_moments(mu, sigma, slope, offset, nmean, nstd)
    a = mu + sigma * rng.standard_normal((400_000, 4))
    q = slope * a + offset + nmean + nstd * rng.standard_normal((400_000, 4))
    h, g = np.maximum(a, 0), np.maximum(q, 0)
    emp = {"Eh": h.mean(0), "Eh2": (h * h).mean(0), "Eg": g.mean(0), "Eg2": (g * g).mean(0), "Ehg": (h * g).mean(0)}
    for k, v in emp.items():
        np.testing.assert_allclose(mom[k], v, rtol=0.01, atol=2e-3, err_msg=k)
    c = compensation(mom)
    c_emp = ((h * g).mean(0) - h.mean(0) * g.mean(0)) / g.var(0)
    np.testing.assert_allclose(c, c_emp, rtol=0.02)
    assert np.abs(c - 1).max() > 0.05  # the cases are not trivial


# -- the pair --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    stats_x = rng.standard_normal((512, 3, 12, 12)).astype(np.float32)  # what "training" saw: only in the BN
    calib = rng.standard_normal((64, 3, 12, 12)).astype(np.float32)
    test = rng.standard_normal((256, 3, 12, 12)).astype(np.float32)  # data the correction never sees
    net = bn_net(stats_x)
    example = (torch.from_numpy(calib[:2]),)
    names = [n.name for n in prepare_model(net, example_inputs=example).graph.nodes if n.kind == "conv2d"]
    return net, calib, test, example, names


def _quantize(pair, bits1: int, corrections=()):
    net, calib, _, example, names = pair
    cfg = AnnotateConfig(weight_bits=8, node_weight_bits={names[0]: bits1})
    return quantize(net, DEVICE, calib, example_inputs=example, annotate_config=cfg, corrections=list(corrections))


def _second_output(graph, strategy, names, bits1, x):
    """``(FP32 reference, mixed-precision output)`` of the second conv: weights as realize quantizes them
    (the first at ``bits1``, the second at 8 bits, after the strategy's corrections), float activations."""
    g = corrected_graph(graph, strategy)
    n1, n2 = graph.node(names[0]), g.node(names[1])

    def in_scale(node):
        return float(np.asarray(strategy.resolved(node.inputs[0]).qparams.scale).ravel()[0])

    t = torch.from_numpy
    with torch.no_grad():
        ref = F.conv2d(torch.relu(F.conv2d(x, t(n1.weight), t(n1.bias))), t(graph.node(names[1]).weight),
                       t(graph.node(names[1]).bias))
        hq = torch.relu(F.conv2d(x, t(fake_quantized_weight(n1, bits1, in_scale(n1))), t(n1.bias)))
        out = F.conv2d(hq, t(fake_quantized_weight(n2, 8, in_scale(n2))), t(n2.bias))
    return ref, out, hq


def _oracle(graph, names, hq, x):
    """``(output, c)``: the best per-channel scale + bias of the second layer's input feature map, fitted on
    the test data itself."""
    n1, n2 = graph.node(names[0]), graph.node(names[1])
    t = torch.from_numpy
    with torch.no_grad():
        h = torch.relu(F.conv2d(x, t(n1.weight), t(n1.bias)))
        m_h, m_g = h.mean((0, 2, 3)), hq.mean((0, 2, 3))
        c = ((h * hq).mean((0, 2, 3)) - m_h * m_g) / hq.var((0, 2, 3), unbiased=False)
        fixed = c.view(1, -1, 1, 1) * (hq - m_g.view(1, -1, 1, 1)) + m_h.view(1, -1, 1, 1)
        return F.conv2d(fixed, t(n2.weight), t(n2.bias)), c.numpy()


@pytest.mark.parametrize("bits1, bound", [(2, 0.80), (3, 0.97)])
def test_dfmpc_lowers_the_pair_error_without_data(pair, bits1, bound):
    net, _, test, _, names = pair
    q = _quantize(pair, bits1)
    x = torch.from_numpy(test)
    mse = lambda y, ref: float(((y - ref) ** 2).mean())  # noqa: E731
    ref, plain, hq = _second_output(q.graph, q.strategy, names, bits1, x)
    errs, scales = {}, {}
    for label, options in (("moments", {}), ("moments_nobias", {"bias": False}), ("norm", {"form": "norm",
                                                                                            "bias": False})):
        strat = copy.deepcopy(q.strategy)
        report = get_correction("dfmpc", **options).run(CorrectionContext(q.fp32, q.graph, strat, None, None))
        assert report["pairs"] == 1, report
        op = strat.ops[names[1]]
        assert op.weight_scale_in is not None and len(op.weight_scale_in) == 16
        assert (op.bias_delta is not None) == options.get("bias", True)
        assert strat.ops[names[0]].weight_scale_in is None
        errs[label] = mse(_second_output(q.graph, strat, names, bits1, x)[1], ref)
        scales[label] = np.asarray(op.weight_scale_in)
    best, c_best = _oracle(q.graph, names, hq, x)
    e_plain, e_best = mse(plain, ref), mse(best, ref)
    # the model (BN statistics, the filters' error split along w) predicts each channel's optimal scale
    np.testing.assert_allclose(scales["moments"], c_best, rtol=0.025)  # measured: 1.3% / 0.5% at most
    assert np.abs(scales["norm"] / c_best - 1).max() > 0.05  # the norm ratio does not (up to 31% / 8% off)
    ratio = errs["moments"] / e_plain
    # measured (MSE of the second conv's output / uncompensated): 2 bits 0.726 (no bias 0.732, norm 0.751,
    # fitted on the test data 0.72); 3 bits 0.931 (0.944, 0.956, 0.93). A per-channel compensation cannot
    # undo the part of the rounding error that is orthogonal to each filter: that is the rest.
    assert ratio < bound, (ratio, errs, e_plain)
    # and reaches that fitted optimum's output error (0.1% / 0.6% of the gain short of it). The output error
    # is flat around it: E[hg] / E[g^2] with the bias shift scores the same, only the scales above tell.
    assert errs["moments"] - e_best < 0.02 * (e_plain - e_best), (errs, e_best, e_plain)
    assert errs["moments"] < errs["norm"] and errs["moments_nobias"] < e_plain, errs


def test_dfmpc_still_helps_when_the_input_is_correlated():
    """The model assumes the first layer's input patches are isotropic; real inputs are not. Here they are
    correlated across channels and neighbouring pixels (and have a mean the model does not know)."""
    rng = np.random.default_rng(0)

    def draw(n):
        t = torch.from_numpy(rng.standard_normal((n, 3, 14, 14)).astype(np.float32))
        t = torch.einsum("nchw,dc->ndhw", t, torch.full((3, 3), 0.5) + 0.5 * torch.eye(3))
        return (0.5 * t[:, :, 1:-1, 1:-1] + 1.5 * F.conv2d(t, torch.ones(3, 1, 3, 3) / 9, groups=3) + 0.3).numpy()

    stats_x, calib, test = draw(512), draw(64), draw(256)
    net = bn_net(stats_x)
    example = (torch.from_numpy(calib[:2]),)
    names = [n.name for n in prepare_model(net, example_inputs=example).graph.nodes if n.kind == "conv2d"]
    q = _quantize((net, calib, test, example, names), 2)
    x = torch.from_numpy(test)
    ref, plain, hq = _second_output(q.graph, q.strategy, names, 2, x)
    mse = lambda y: float(((y - ref) ** 2).mean())  # noqa: E731
    errs = {}
    for label, options in (("moments", {}), ("norm", {"form": "norm", "bias": False})):
        strat = copy.deepcopy(q.strategy)
        get_correction("dfmpc", **options).run(CorrectionContext(q.fp32, q.graph, strat, None, None))
        errs[label] = mse(_second_output(q.graph, strat, names, 2, x)[1])
    e_plain, e_best = mse(plain), mse(_oracle(q.graph, names, hq, x)[0])
    # measured / uncompensated: moments 0.742, norm 0.777, the per-channel optimum fitted on the data 0.644
    assert errs["moments"] < 0.8 * e_plain and errs["moments"] < errs["norm"], (errs, e_plain, e_best)
    assert e_best < errs["moments"]  # the isotropy assumption costs something here (the optimum needs data)


def test_dfmpc_through_a_flatten_into_a_dense_layer(run_tvm):
    """conv(2 bits) -> BN -> ReLU -> flatten -> linear(8 bits): each channel's scale repeats over its rows
    (realized program, measured: output MSE 0.0543 -> 0.0349, 0.64x)."""
    rng = np.random.default_rng(2)
    stats_x, calib, test = (rng.standard_normal((n, 3, 6, 6)).astype(np.float32) for n in (512, 64, 256))
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    fit_bn_stats(net[0], net[1], stats_x)
    net.eval()
    example = (torch.from_numpy(calib[:2]),)
    conv = [n.name for n in prepare_model(net, example_inputs=example).graph.nodes if n.kind == "conv2d"][0]
    cfg = AnnotateConfig(weight_bits=8, node_weight_bits={conv: 2})
    plain = quantize(net, DEVICE, calib, example_inputs=example, annotate_config=cfg)
    fixed = quantize(net, DEVICE, calib, example_inputs=example, annotate_config=cfg, corrections=["dfmpc"])
    dense = [n for n in fixed.graph.nodes if n.kind == "dense"][0]
    scale = np.asarray(fixed.strategy.ops[dense.name].weight_scale_in)
    assert scale.shape == (128,) and np.all(scale.reshape(8, 16) == scale.reshape(8, 16)[:, :1])
    with torch.no_grad():
        ref = net(torch.from_numpy(test)).numpy()
    e = {k: float(((run_tvm(q.realized.mod, test) - ref) ** 2).mean()) for k, q in (("plain", plain),
                                                                                     ("fixed", fixed))}
    assert e["fixed"] < 0.85 * e["plain"], e


def test_dfmpc_strategy_round_trips_and_replays(pair, tmp_path, run_tvm):
    net, _, test, example, names = pair
    q = _quantize(pair, 2, ["dfmpc"])
    assert q.strategy.corrections == ["dfmpc"]
    scale = q.strategy.ops[names[1]].weight_scale_in
    assert scale is not None and min(scale) < 0.9  # 2-bit weights: the compensation shrinks channels
    q.strategy.save(tmp_path / "s.json")
    raw = json.loads((tmp_path / "s.json").read_text())
    assert raw["ops"][names[1]]["weight_scale_in"] == pytest.approx(scale)
    assert "weight_scale_in" not in raw["ops"][names[0]]  # optional: other layers' JSON is as before
    loaded = Strategy.load(tmp_path / "s.json")
    assert loaded.to_json() == q.strategy.to_json()
    replay = quantize(net, DEVICE, strategy=tmp_path / "s.json", example_inputs=example)
    out = run_tvm(q.realized.mod, test)
    np.testing.assert_array_equal(run_tvm(replay.realized.mod, test), out)
    # the realized integer program (activations quantized too) is closer to FP32 than without dfmpc
    plain = run_tvm(_quantize(pair, 2).realized.mod, test)
    with torch.no_grad():
        ref = net(torch.from_numpy(test)).numpy()
    e_fixed, e_plain = float(((out - ref) ** 2).mean()), float(((plain - ref) ** 2).mean())
    assert e_fixed < 0.85 * e_plain, (e_fixed, e_plain)


def test_dfmpc_without_an_eligible_pair_changes_nothing(pair, caplog):
    q = _quantize(pair, 8)  # both layers 8 bits: no low-bit -> high-bit pair
    strat = copy.deepcopy(q.strategy)
    with caplog.at_level(logging.INFO, logger="hago.correct.dfmpc"):
        report = get_correction("dfmpc").run(CorrectionContext(q.fp32, q.graph, strat, None, None))
    lines = [r.getMessage() for r in caplog.records if r.name == "hago.correct.dfmpc"]
    assert report["pairs"] == 0 and len(lines) == 1 and "nothing compensated" in lines[0], lines
    assert strat.to_json() == q.strategy.to_json()
    # a low-bit first layer without batch-norm statistics: skipped, said so, nothing changed either
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    calib = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    example = (torch.from_numpy(calib[:2]),)
    first = [n.name for n in prepare_model(net, example_inputs=example).graph.nodes if n.kind == "conv2d"][0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hago.correct.dfmpc"):
        q2 = quantize(net, DEVICE, calib, example_inputs=example, corrections=["dfmpc"],
                      annotate_config=AnnotateConfig(node_weight_bits={first: 3}))
    lines = [r.getMessage() for r in caplog.records if r.name == "hago.correct.dfmpc"]
    assert len(lines) == 1 and "no batch norm" in lines[0], lines
    assert all(op.weight_scale_in is None and op.bias_delta is None for op in q2.strategy.ops.values())


# -- storage ---------------------------------------------------------------------------------------
class _Attrs:
    def __init__(self, groups):
        self.groups = groups


class _Call:
    def __init__(self, groups):
        self.attrs = _Attrs(groups)


class _Node:
    def __init__(self, kind, groups=1):
        self.kind, self.call, self.name = kind, _Call(groups), "n"


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_scale_input_channels_is_exact(groups):
    rng = np.random.default_rng(groups)
    w = rng.standard_normal((6, 6 // groups, 3, 3)).astype(np.float32)
    x = rng.standard_normal((2, 6, 5, 5)).astype(np.float32)
    c = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    ws = scale_input_channels(_Node("conv2d", groups), w, c)
    t = torch.from_numpy
    want = F.conv2d(t(x * c.reshape(1, -1, 1, 1)), t(w), groups=groups)
    np.testing.assert_allclose(F.conv2d(t(x), t(ws), groups=groups).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    wd = rng.standard_normal((6, 4)).astype(np.float32)  # dense [K, N]
    np.testing.assert_allclose(x[:, :, 0, 0] @ scale_input_channels(_Node("dense"), wd, c),
                               (x[:, :, 0, 0] * c) @ wd, rtol=1e-5, atol=1e-5)
    with pytest.raises(QuantizeError, match="weight_scale_in"):
        scale_input_channels(_Node("conv2d", groups), w, c[:5])


def test_bad_weight_scale_in_is_refused(pair):
    q = _quantize(pair, 2, ["dfmpc"])
    name = pair[4][1]
    d = q.strategy.to_json()
    for bad in (-1.0, float("nan"), "x"):
        d2 = copy.deepcopy(d)
        d2["ops"][name]["weight_scale_in"][0] = bad
        with pytest.raises(QuantizeError, match="weight_scale_in"):
            Strategy.from_json(json.loads(json.dumps(d2)))
    assert "dfmpc" in CORRECTIONS
    # adaround's rounding is learned on the unscaled weights: the two on one layer are refused, not mixed
    strat = copy.deepcopy(q.strategy)
    strat.ops[name].weight_round = "x"
    with pytest.raises(QuantizeError, match="do not compose"):
        corrected_graph(q.graph, strat)


def test_a_search_compensates_each_candidates_own_pairs(pair, tmp_path):
    """``dfmpc`` in a search: the pairs depend on the neighbours' bits, so it runs on every candidate's own
    strategy (closed form, no data), after the per-layer ``bias`` results are copied in. A candidate with the
    first conv at 4 bits before the 8-bit second gets the compensation ``hago compile --corrections bias,dfmpc``
    gives the same choice; the all-8-bit candidate has no pair and none."""
    from hago.search.engine import SearchEngine

    net, calib, test, example, names = pair
    name = prepare_model(net, example_inputs=example).graph.params[0].name
    e = SearchEngine(net, DEVICE, {name: calib}, {name: test[:32]}, log_path=tmp_path / "s.jsonl",
                     example_inputs=example, cache_dir=tmp_path / "cache", corrections=("dfmpc", "bias"),
                     max_trials=2)
    wide = e.space.widest()
    low = tuple(4 if (k.kind, k.name) == ("weight", names[0]) else w for k, w in zip(e.space.knobs, wide))
    assert low != wide
    s_low, s_wide = e.strategy(low), e.strategy(wide)
    assert s_low.corrections == ["bias", "dfmpc"] and s_low.ops[names[0]].weight_bits == 4  # as applied
    assert all(op.weight_scale_in is None for op in s_wide.ops.values())
    compiled = _quantize(pair, 4, ["bias", "dfmpc"])
    np.testing.assert_allclose(s_low.ops[names[1]].weight_scale_in, compiled.strategy.ops[names[1]].weight_scale_in,
                               rtol=1e-5)
    np.testing.assert_allclose(s_low.ops[names[1]].bias_delta, compiled.strategy.ops[names[1]].bias_delta, rtol=1e-4,
                               atol=1e-6)


def test_a_search_refuses_dfmpc_before_a_correction_that_writes_weights(pair, tmp_path):
    """A search runs ``dfmpc`` on each candidate *after* the per-layer corrections, which ``hago compile`` does
    only when they are listed first (``dfmpc,adaround_conv`` there refuses a compensated layer; ``dfmpc,gptq``
    leaves it to dfmpc). Listing it before one that writes weights is refused in one line naming the order
    that works, before any work; ``bias`` after it stays allowed (it writes no weights)."""
    from hago.search.engine import SearchEngine, SearchError

    net, calib, test, example, _ = pair
    name = prepare_model(net, example_inputs=example).graph.params[0].name
    for order, culprit in ((("dfmpc", "adaround_conv"), "adaround_conv"), (("bias", "dfmpc", "gptq"), "gptq")):
        with pytest.raises(SearchError, match=f"list it after {culprit} .*{','.join(n for n in order if n != 'dfmpc')},dfmpc"):
            SearchEngine(net, DEVICE, {name: calib}, {name: test[:32]}, log_path=tmp_path / "s.jsonl",
                         example_inputs=example, cache_dir=tmp_path / "cache", corrections=order, max_trials=2)
    assert not list((tmp_path / "cache").rglob("corrections-*"))  # refused before any correction ran
