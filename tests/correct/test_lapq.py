"""LAPQ (hago.correct.lapq) on real numbers.

A small CNN classifier with 4-bit activations calibrated by minmax, where
clipping matters: the Lp-norm clips must beat minmax on the network loss,
Powell's joint search must beat the best single ``p``, and the integer build
of the corrected strategy must use the new ranges and be closer to FP32 on
images the search never saw. The simulated program with run-time ranges must
compute exactly what the one with constant ranges does.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from hago.annotate import AnnotateConfig
from hago.build import static_batch
from hago.compiler import quantize
from hago.correct import CORRECTIONS, CorrectionContext, get_correction
from hago.correct.lapq import searched_edges
from hago.correct.lp_clip import shrunk_qparams
from hago.frontend import load_model
from hago.hwspec import HardwareSpec
from hago.pipeline import realized_program
from hago.simulate import range_input_values, simulate
from hago.strategy import Strategy
from images import smooth_images

pytestmark = pytest.mark.llvm
DEVICE = "x86-avx512-vnni"
BATCH = 32


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()
    with torch.no_grad():
        net[-1].weight.mul_(30.0)  # logits a trained classifier's size: the softmax is not flat
    return net


@pytest.fixture(scope="module")
def case(cpu_target):
    net = _cnn()
    calib, test = smooth_images(128, 1, noise=0.2), smooth_images(256, 2, noise=0.2)
    mod = load_model(net, example_inputs=(torch.from_numpy(calib[:2]),))
    q = quantize(mod, DEVICE, calib, annotate_config=AnnotateConfig(activation_bits=4), calibrator="minmax",
                 batch_size=BATCH)
    strat = copy.deepcopy(q.strategy)
    ctx = CorrectionContext(q.prepared.fp32, q.graph, strat, q.prepared.calib, cpu_target, BATCH)
    report = get_correction("lapq", maxfev=80).run(ctx)  # the default budget is 260 evaluations here
    with torch.no_grad():
        ref = net(torch.from_numpy(test)).numpy()
    return q, strat, report, test, ref


def _kl(out: np.ndarray, ref: np.ndarray) -> float:
    def logp(z):
        z = z.astype(np.float64) - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    lp, lq = logp(ref), logp(out)
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


def test_registered_and_listed_in_cli_help():
    from hago.cli import build_parser

    assert "lapq" in CORRECTIONS and not CORRECTIONS["lapq"].local
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for cmd in ("compile", "search"):
        assert "lapq" in sub[cmd].format_help(), cmd


def test_run_time_ranges_compute_what_constant_ranges_do(case, cpu_target):
    q, _, _, test, _ = case
    edges = searched_edges(q.strategy)
    assert len(edges) == 4  # the input and the three conv outputs (4-bit, asymmetric uint8)
    other = copy.deepcopy(q.strategy)  # different ranges, baked in as constants
    for e, alpha in zip(edges, (0.5, 0.7, 0.6, 0.4)):
        c = other.edges[e]
        c.qparams = shrunk_qparams(*c.range, alpha, c.dtype, c.bits, c.symmetric)
    const_vm = relax.VirtualMachine(tvm.compile(static_batch(simulate(q.graph, other), BATCH), target=cpu_target),
                                    tvm.cpu())
    param_vm = relax.VirtualMachine(tvm.compile(static_batch(simulate(q.graph, q.strategy, range_inputs=edges), BATCH),
                                                target=cpu_target), tvm.cpu())
    x = tvm.runtime.tensor(np.ascontiguousarray(test[:BATCH]))
    want = const_vm["main"](x).numpy()
    got = param_vm["main"](x, *[tvm.runtime.tensor(range_input_values(other.edges[e].qparams)) for e in edges])
    np.testing.assert_array_equal(got.numpy(), want)  # bit for bit
    calibrated = param_vm["main"](x, *[tvm.runtime.tensor(range_input_values(q.strategy.edges[e].qparams))
                                       for e in edges]).numpy()
    assert np.abs(calibrated - want).max() > 1e-3  # the inputs really set the ranges


def test_powell_lowers_the_loss_below_minmax_and_the_best_p(case):
    """Measured at registration (KL on the 128 calibration images): minmax 2.97e-3, best p (2.22) 1.47e-3,
    quadratic p (2.0) 1.72e-3, Powell 1.38e-3 after 260 evaluations, about 5 s in all."""
    _, _, r, _, _ = case
    assert r["loss"] == "kl" and r["edges"] == 4 and r["kept"] != "calibrated", r
    assert r["loss_best_p"] < 0.8 * r["loss_calibrated"], r
    assert r["loss_start"] <= min(r["loss_best_p"], r["loss_quadratic_p"]), r
    assert r["loss_final"] < r["loss_best_p"], r
    assert r["powell_evaluations"] > 0


def test_realized_build_uses_the_new_ranges_and_is_closer_to_fp32(case, run_tvm):
    """Held-out KL of the integer builds, measured at registration: minmax 2.6e-3, lapq 1.7e-3."""
    q, strat, _, test, ref = case
    for e in searched_edges(strat):
        assert strat.edges[e].range != q.strategy.edges[e].range, e
        assert float(strat.edges[e].qparams.scale) < float(q.strategy.edges[e].qparams.scale), e  # clipped
    replayed = Strategy.from_json(json.loads(json.dumps(strat.to_json())))  # as strategy.json replays
    spec = HardwareSpec.load(DEVICE)
    base = run_tvm(q.realized.mod, test)
    corrected = run_tvm(realized_program(q.prepared, replayed, spec).mod, test)
    assert not np.array_equal(base, corrected)
    assert _kl(corrected, ref) < 0.9 * _kl(base, ref), (_kl(corrected, ref), _kl(base, ref))
