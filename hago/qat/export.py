"""Export: a trained fake-quantized torch model -> an ONNX model plus a pre-quantized hago strategy.

``hago compile MODEL.onnx --strategy strategy.json`` then builds the integer
program the training ran, with nothing re-decided:

* **weights.** The ONNX file holds each layer's weight as the float32
  product ``code * step`` the forward pass used, and the strategy holds the
  step per output channel (``OpChoice.weight_scale``). Realize divides by the
  given step and rounds: the relative error of a float32 product is below
  2^-24, so ``round(w / step)`` is the trained code exactly (``|code| <= 15``),
  with no max-abs rescale and no bias floor moving the grid.
* **activations.** Each quantized layer's input range becomes the qparams of
  the hago edge that carries it: ``scale = step`` and its zero point, uint8
  with ``[0, 2^bits - 1]``. For ``conv -> relu -> pool -> conv`` that edge is
  the first conv's output (relu and pool alias it), so the first conv
  requantizes straight onto the second layer's trained grid; the relu and
  the max pool then change nothing, exactly as ``Q(pool(relu(y)))`` equals
  ``pool(Q(relu(y)))`` in the torch model.
* **bits.** A ``k``-bit layer is ``k``-bit in hago on the zero grid, ``k + 1``
  on the reference's odd grid (:mod:`hago.qat.quantizers`).
* **biases.** The fake-quant forward already rounds each bias onto its
  int32 grid (``round(b / (s_x s_w))``, :meth:`QuantLayer.quantized_bias`)
  and the ONNX file holds that rounded bias, so realize's int32 bias is the
  one the training used.

What remains different is float32 against integer arithmetic: torch sums
the products in float32, the integer program in int32 and requantizes in
fixed point (half away from zero, torch rounds half to even). A code moves
only where a value lies within float32 noise of a rounding boundary. Measured
on MNIST test images: the tiny test CNN's logits agree within 5e-6 (1,000
images), the bundled MNIST CNN's within 2.3e-5 (2,000), every argmax equal.
That is float32 rounding of the last sums: one 4-bit activation step moves a
logit by orders of magnitude more, so no activation code differed.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hago.annotate import AnnotateConfig, annotate
from hago.errors import QuantizeError
from hago.hwspec import HardwareSpec
from hago.pipeline import prepare_model
from hago.qparams import QParams
from hago.strategy import Strategy

from .layers import QuantLayer, quant_layers
from .quantizers import export_bits

log = logging.getLogger(__name__)


def float_model(model: nn.Module) -> nn.Module:
    """A copy of ``model``, each :class:`QuantLayer` back to a plain layer: weight ``Q(w)``, bias on its int32 grid."""
    for layer in quant_layers(model):  # the last training pass's Q(w) is a graph node: deepcopy refuses it
        layer.qweight, layer.epsilon = None, None
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLayer):
                inner = child.inner
                with torch.no_grad():
                    inner.weight.copy_(child.weight_q(inner.weight))
                    if inner.bias is not None:  # already on the int32 grid: realize's round gives it back exactly
                        inner.bias.copy_(child.quantized_bias())
                setattr(parent, name, inner)
    return out.eval()


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """The float model of ``model`` as ONNX (input ``input``, output ``logits``, dynamic batch ``N``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(float_model(model), (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return path


def activation_qparams_of(layer: QuantLayer) -> QParams:
    """The hago edge parameters of ``layer``'s input quantizer (uint8 container, ``[0, 2^bits - 1]``)."""
    aq = layer.input_q
    with torch.no_grad():
        step, zp = float(aq.step()), int(aq.zero_point())
    return QParams(np.float32(step), np.int32(zp), "uint8", 0, aq.levels, None)


def _owner(strategy: Strategy, edge: str) -> str:
    """The edge that owns ``edge``'s parameters (passthrough ops alias their input)."""
    seen = set()
    while strategy.edges[edge].alias_of is not None and edge not in seen:
        seen.add(edge)
        edge = strategy.edges[edge].alias_of
    return edge


def _weight_in_hago_layout(node, w: np.ndarray) -> np.ndarray:
    return w.T if node.kind == "dense" else w  # hago's dense weight is [K, N]; torch's Linear is [N, K]


def build_strategy(model: nn.Module, onnx_path: str | Path, device: str | HardwareSpec,
                   method: str = "saq", calib: np.ndarray | None = None) -> Strategy:
    """The pre-quantized strategy that realizes ``model`` (exported to ``onnx_path``) on ``device``.

    The hago graph's weighted nodes are matched to the model's quantized
    layers in order, and each match is checked (shape and float weights
    equal), so a model whose ONNX graph reorders or folds its layers is
    refused with one line rather than given the wrong parameters.

    Edges no trained layer reads (a residual add's inputs and output, which
    the training left in float) are calibrated like post-training quantization
    on ``calib`` (the exported model's inputs; hago's ``mse`` calibrator), so
    a ResNet exports too; without ``calib`` such a model is refused. Those
    edges are the one place the integer program departs from the training's
    fake-quant forward.
    """
    spec = device if isinstance(device, HardwareSpec) else HardwareSpec.load(device)
    prepared = prepare_model(str(onnx_path), None if calib is None else {"input": np.asarray(calib, np.float32)})
    graph = prepared.graph
    layers = quant_layers(model)
    nodes = [n for n in graph.nodes if n.weighted]
    if len(nodes) != len(layers):
        raise QuantizeError(f"the exported graph has {len(nodes)} conv/dense layers, the trained model "
                            f"{len(layers)}: hago qat exports chains of Conv2d/Linear layers only")
    exported = float_model(model)  # the weights as the ONNX file holds them
    float_layers = [m for m in exported.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for node, flayer in zip(nodes, float_layers):
        w = _weight_in_hago_layout(node, flayer.weight.detach().numpy())
        if node.weight is None or node.weight.shape != w.shape or not np.array_equal(node.weight, w):
            raise QuantizeError(f"{node.name}: its weight is not the trained layer's ({type(flayer).__name__} "
                                f"{tuple(flayer.weight.shape)}); the ONNX graph changed the layer order or folded a "
                                "batch norm into it: fold batch norms before training "
                                "(torch.nn.utils.fusion.fuse_conv_bn_eval)")

    bits = {n.name: export_bits(m.weight_q.bits, m.weight_q.grid) for n, m in zip(nodes, layers)}
    first = annotate(graph, spec, prepared.graph_hash, AnnotateConfig(node_weight_bits=bits))
    edge_qp: dict[str, QParams] = {}
    for node, layer in zip(nodes, layers):
        owner = _owner(first, node.inputs[0])
        qp = activation_qparams_of(layer)
        if owner in edge_qp and edge_qp[owner] != qp:
            # hago quantizes an edge once; two layers (a block's conv and its shortcut) learned two ranges for
            # it: the wider one keeps both layers' inputs unclipped, the other layer sees a coarser grid
            widest = max(edge_qp[owner], qp, key=lambda q: float(q.scale) * (q.qmax - int(q.zero_point)))
            log.warning("edge %s feeds two trained layers with different input ranges: the wider one is used",
                        owner)
            qp = widest
        edge_qp[owner] = qp
    edge_bits = {e: layer.input_q.bits for e, layer in
                 ((_owner(first, n.inputs[0]), m) for n, m in zip(nodes, layers))}
    strategy = annotate(graph, spec, prepared.graph_hash,
                        AnnotateConfig(node_weight_bits=bits, edge_bits=edge_bits, dynamic=False))
    if calib is not None:  # every edge gets a calibrated range first; the trained ones are overwritten below
        _calibrate(prepared, strategy)
    strategy.calibrator = method
    for name, qp in edge_qp.items():
        edge = strategy.edges[name]
        if not edge.bits:
            raise QuantizeError(f"edge {name} feeds a trained layer but {spec.name} keeps it float")
        edge.dtype, edge.symmetric, edge.dynamic, edge.qparams = qp.dtype, False, False, qp
        zp, s = int(qp.zero_point), float(qp.scale)
        edge.range = (-zp * s, (qp.qmax - zp) * s)
    missing = [e for e, c in strategy.edges.items() if c.bits and c.alias_of is None and c.qparams is None]
    if missing:
        raise QuantizeError(f"edge {missing[0]} is quantized on {spec.name} but no trained layer reads it (a "
                            "residual add?): pass calibration inputs to calibrate such edges")
    for node, layer in zip(nodes, layers):
        op = strategy.ops[node.name]
        if op.mode != "integer":
            raise QuantizeError(f"{node.name} cannot run in integer on {spec.name}: {op.reason}")
        _, step = layer.integer_weight()
        op.weight_bits = bits[node.name]
        op.weight_scale = [float(v) for v in step.numpy().astype(np.float32)]
        op.reason = f"trained ({method}): integer weights and input range from the training"
    return strategy


def _calibrate(prepared, strategy: Strategy) -> None:
    """Ranges for every quantized edge of ``strategy`` from ``prepared``'s calibration samples (PTQ's ``mse``)."""
    from hago.build import host_target
    from hago.calibrate import get_calibrator
    from hago.observe import apply_ranges, observe
    from hago.pipeline import CALIB_BATCH

    calibrator = get_calibrator("mse")
    observe(prepared.fp32, prepared.graph, prepared.calib, calibrator, host_target(), prepared.batch_for(CALIB_BATCH))
    apply_ranges(strategy, calibrator)


def export(model: nn.Module, example: torch.Tensor, out_dir: str | Path, device: str | HardwareSpec,
           method: str = "saq", calib: np.ndarray | None = None) -> tuple[Path, Path]:
    """Write ``model.onnx`` and ``strategy.json`` for ``device`` under ``out_dir``; their paths. ``calib``:
    inputs that calibrate the edges no trained layer reads (:func:`build_strategy`)."""
    out = Path(out_dir)
    onnx_path = export_onnx(model, example, out / "model.onnx")
    strategy = build_strategy(model, onnx_path, device, method, calib)
    strategy.save(out / "strategy.json")
    return onnx_path, out / "strategy.json"
