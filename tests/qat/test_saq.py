"""SAQ (sharpness-aware QAT, hago.qat) on real MNIST, and its export replayed through hago's integer realize.

One small CNN (conv 1->8 s2, conv 8->16 s2, dense 784->10; every layer W4,
activations A4, the image A8) is trained in FP32 once, then fine-tuned at
W4A4 with plain QAT and with SAQ for 100 steps of 64 on MNIST's training
split (fixed seed). The trained SAQ model is exported (ONNX + strategy) and
replayed through ``hago.compiler.quantize`` for x86-avx512-vnni, the replay
``hago compile --strategy`` runs; its realized integer program is checked
against the torch fake-quant model on 1,000 test images.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hago import zoo
from hago.annotate import AnnotateConfig
from hago.compiler import quantize as hago_quantize
from hago.qat import (QuantConfig, TrainConfig, export, export_onnx, logits_of, quant_layers, quantize_model, top1,
                      train)
from hago.qat.quantizers import round_ste

pytestmark = [pytest.mark.llvm]

DEVICE = "x86-avx512-vnni"
N_TEST = 1000  # images the integer program is compared on
N_ACCURACY = 2000  # images accuracy is measured on
W4A4 = QuantConfig(weight_bits=4, act_bits=4, input_bits=8)
RHO = 0.05  # SAQ's radius here (the reference's 0.3 perturbs standardized weights; see hago.qat.train)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Training on one thread: deterministic and faster than two threads contending on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mnist_split():
    """``(train, calib)``: 20,000 training images with labels, and 256 other training images for PTQ's calibration."""
    x, y = zoo.mnist_data("train")
    return (x[:20000], y[:20000]), x[-256:]


@pytest.fixture(scope="module")
def mnist_train(mnist_split):
    return mnist_split[0]


@pytest.fixture(scope="module")
def fp32_model(mnist_train):
    """The tiny CNN trained in FP32 (400 Adam steps of 64, seed 0)."""
    x, y = mnist_train
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(400):
        idx = torch.randint(0, len(xt), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(xt[idx]), yt[idx]).backward()
        opt.step()
    return model.eval()


def fine_tuned(fp32_model, mnist_train, method: str) -> nn.Module:
    x, y = mnist_train
    model = quantize_model(copy.deepcopy(fp32_model), torch.from_numpy(x[:256]), W4A4)
    train(model, x, y, TrainConfig(method=method, steps=100, batch=64, lr=0.01, rho=RHO, seed=1))
    return model


@pytest.fixture(scope="module")
def trained(fp32_model, mnist_train):
    return {m: fine_tuned(fp32_model, mnist_train, m) for m in ("qat", "saq")}


@pytest.fixture(scope="module")
def saq_export(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("saq_export")
    onnx_path, strategy_path = export(trained["saq"], torch.zeros(1, 1, 28, 28), out, DEVICE, method="saq")
    return onnx_path, strategy_path, hago_quantize(str(onnx_path), DEVICE, strategy=strategy_path)


# -- the SAQ step itself ----------------------------------------------------------------------------------------
def test_saq_adds_its_perturbation_to_the_quantized_weight():
    """One SGD step of SAQ equals the hand-computed case (iii) update, and differs from plain QAT's."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    base = nn.Sequential(nn.Linear(16, 4))
    lr, rho = 0.1, 0.05

    def stepped(method):
        m = quantize_model(copy.deepcopy(base), x, W4A4)
        before = m[0].inner.weight.detach().clone(), m[0].inner.bias.detach().clone()
        train(m, x.numpy(), y.numpy(), TrainConfig(method=method, steps=1, batch=32, lr=lr, momentum=0.0, rho=rho))
        return m, before

    saq, (w0, b0) = stepped("saq")
    qat, _ = stepped("qat")
    # by hand: the gradient at Q(w), eps on Q(w) and on the bias, the gradient at the perturbed point
    ref = quantize_model(copy.deepcopy(base), x, W4A4)[0]
    # train() draws its batch with replacement: replay the same indices
    idx = torch.randint(0, 32, (32,), generator=torch.Generator().manual_seed(0))
    xb, yb = x[idx], y[idx]
    with torch.no_grad():
        xq, wq, acc = ref.input_q(xb), ref.weight_q(ref.inner.weight), ref.accumulator_scale()

    def on_grid(b):  # the bias as the int32 accumulator holds it, straight-through
        return round_ste(b / acc) * acc

    wq1, b1 = wq.clone().requires_grad_(), b0.clone().requires_grad_()
    F.cross_entropy(F.linear(xq, wq1, on_grid(b1)), yb).backward()
    norm = math.sqrt(float(wq1.grad.pow(2).sum() + b1.grad.pow(2).sum()))
    wq2 = (wq + rho * wq1.grad / norm).requires_grad_()
    b2 = (b0 + rho * b1.grad / norm).requires_grad_()
    F.cross_entropy(F.linear(xq, wq2, on_grid(b2)), yb).backward()
    step = ref.weight_q.step().detach().reshape(-1, 1)
    inside = (torch.round(w0 / step).abs() <= ref.weight_q.levels).float()  # the STE passes these
    dw_saq = saq[0].inner.weight.detach() - w0
    dw_qat = qat[0].inner.weight.detach() - w0
    torch.testing.assert_close(dw_saq, -lr * wq2.grad * inside, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(saq[0].inner.bias.detach() - b0, -lr * b2.grad, atol=1e-6, rtol=1e-4)
    assert (dw_saq - dw_qat).abs().max() > 1e-3 * dw_qat.abs().max() + 1e-6
    # the same eps on the latent weight (case (i)) would mostly round away: why SAQ adds it after quantizing
    with torch.no_grad():
        eps = rho * wq1.grad / norm
        moved = ref.weight_q(ref.inner.weight + eps) != wq
    assert moved.float().mean() < 0.1


# -- training on real data --------------------------------------------------------------------------------------
def test_w4a4_training_beats_post_training_quantization(trained, fp32_model, mnist_split, mnist_test, tmp_path,
                                                        run_tvm):
    x, y = mnist_test[0][:N_ACCURACY], mnist_test[1][:N_ACCURACY]
    fp32 = top1(logits_of(fp32_model, x), y)
    acc = {m: top1(logits_of(model, x), y) for m, model in trained.items()}
    onnx_path = export_onnx(fp32_model, torch.zeros(1, 1, 28, 28), tmp_path / "fp32.onnx")
    calib = {"input": mnist_split[1]}
    ptq = hago_quantize(str(onnx_path), DEVICE, calib, corrections=[],
                        annotate_config=AnnotateConfig(weight_bits=4, activation_bits=4, edge_bits={"input:input": 8}))
    ptq_acc = top1(run_tvm(ptq.realized.mod, x), y)
    print(f"fp32 {fp32:.4f}  PTQ W4A4 {ptq_acc:.4f}  QAT {acc['qat']:.4f}  SAQ {acc['saq']:.4f}")
    # measured (2,000 test images): FP32 94.45%, PTQ W4A4 93.80%, QAT 95.70%, SAQ 95.30%. The tiny FP32 model
    # is not converged, so part of the trained models' lead is the 100 extra steps, not the quantization
    assert fp32 >= 0.94
    assert acc["saq"] >= 0.95 and acc["qat"] >= 0.95
    assert acc["saq"] > ptq_acc + 0.01


# -- export and replay ------------------------------------------------------------------------------------------
def test_realized_integer_weights_are_the_trained_ones(trained, saq_export):
    _, _, replayed = saq_export
    nodes = [n for n in replayed.graph.nodes if n.weighted]
    layers = quant_layers(trained["saq"])
    assert len(nodes) == len(layers) == 3
    for node, layer in zip(nodes, layers):
        codes, step = layer.integer_weight()
        codes = codes.numpy().T if node.kind == "dense" else codes.numpy()
        realized = replayed.realized.layers[node.name]
        np.testing.assert_array_equal(realized.weight_q.astype(np.int32), codes)
        np.testing.assert_array_equal(realized.weight_scale, step.numpy())
        assert np.abs(codes).max() <= 7  # the zero grid at 4 bits: -7..7
        assert replayed.strategy.ops[node.name].weight_bits == 4


def test_replayed_strategy_matches_the_fake_quant_model(trained, saq_export, mnist_test, run_tvm):
    _, _, replayed = saq_export
    x = mnist_test[0][:N_TEST]
    torch_logits = logits_of(trained["saq"], x)
    int_logits = run_tvm(replayed.realized.mod, x)
    agree = float((torch_logits.argmax(-1) == int_logits.argmax(-1)).mean())
    diff = np.abs(torch_logits - int_logits)
    print(f"argmax agreement {agree:.4f}, logit |diff| max {diff.max():.3g} mean {diff.mean():.3g}")
    assert agree == 1.0
    # float32 rounding of the torch conv/linear sums: every activation code is the same
    assert diff.max() < 1e-3 * np.abs(torch_logits).max()


def test_exported_activation_ranges_are_the_trained_steps(trained, saq_export):
    _, _, replayed = saq_export
    s = replayed.strategy
    nodes = [n for n in replayed.graph.nodes if n.weighted]
    for node, layer in zip(nodes, quant_layers(trained["saq"])):
        qp = s.resolved(node.inputs[0]).qparams
        assert float(qp.scale) == float(layer.input_q.step())
        assert (qp.qmin, qp.qmax) == (0, layer.input_q.levels)
    assert [s.resolved(n.inputs[0]).bits for n in nodes] == [8, 4, 4]


def test_the_reference_grid_exports_as_odd_five_bit_codes(fp32_model, mnist_train, tmp_path):
    """SAQ's zero-less 4-bit grid: codes -15, -13, .., 15 (scale alpha/15), realized as 5-bit integers, exactly."""
    x, y = mnist_train
    model = quantize_model(copy.deepcopy(fp32_model), torch.from_numpy(x[:256]),
                           QuantConfig(weight_bits=4, act_bits=4, input_bits=8, grid="odd"))
    train(model, x, y, TrainConfig(method="saq", steps=5, batch=64, lr=0.01, rho=RHO))
    onnx_path, strategy_path = export(model, torch.zeros(1, 1, 28, 28), tmp_path, DEVICE, method="saq")
    replayed = hago_quantize(str(onnx_path), DEVICE, strategy=strategy_path)
    for node, layer in zip([n for n in replayed.graph.nodes if n.weighted], quant_layers(model)):
        codes, _ = layer.integer_weight()
        codes = codes.numpy().T if node.kind == "dense" else codes.numpy()
        assert np.all(codes % 2 == 1) and np.abs(codes).max() <= 15  # no zero level, 16 levels
        assert len(np.unique(codes)) > 8
        np.testing.assert_array_equal(replayed.realized.layers[node.name].weight_q.astype(np.int32), codes)
        assert replayed.strategy.ops[node.name].weight_bits == 5


def test_hago_qat_command_writes_a_replayable_strategy(tmp_path, mnist_train):
    """``hago qat`` (listed in ``hago --help`` with saq) trains, exports, and its strategy loads for the model."""
    from hago.cli import build_parser, main
    from hago.strategy import Strategy

    assert "saq" in build_parser().format_help()
    x, y = mnist_train
    np.savez(tmp_path / "train.npz", input=x[:512], label=y[:512])
    rc = main(["qat", "--model", f"{__name__}:tiny_cnn", "--data", str(tmp_path / "train.npz"), "--device", DEVICE,
               "--method", "qat", "--steps", "3", "-o", str(tmp_path / "out")])
    assert rc == 0
    strategy = Strategy.load(tmp_path / "out" / "strategy.json")
    scales = [c.weight_scale for c in strategy.ops.values() if c.weight_scale is not None]
    assert len(scales) == 3 and [len(s) for s in scales] == [8, 16, 10]
    assert strategy.calibrator == "qat"


def test_simulate_honours_the_trained_weight_scale(trained, saq_export, mnist_test, run_tvm):
    """The float twin (``hago.simulate``, what bit-width studies run) computes the same model as torch."""
    from hago.simulate import simulate

    _, _, replayed = saq_export
    x = mnist_test[0][:250]
    sim = run_tvm(simulate(replayed.graph, replayed.strategy), x)
    torch_logits = logits_of(trained["saq"], x)
    assert (sim.argmax(-1) == torch_logits.argmax(-1)).all()
    assert np.abs(sim - torch_logits).max() < 1e-3 * np.abs(torch_logits).max()
