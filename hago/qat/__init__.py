"""Quantization-aware training in PyTorch, and its export to a pre-quantized hago strategy.

For models where post-training quantization misses the target: train the
model with fake quantization (learnable clips, per-channel weights,
:mod:`.quantizers`, :mod:`.layers`), either plainly (``qat``) or with SAQ
(``saq``, :mod:`.sam`: sharpness-aware minimization on the quantized weights,
Liu, Cai, Zhuang, arXiv 2111.12273), then export the ONNX model and a
strategy (:mod:`.export`) that ``hago compile --strategy`` realizes with
exactly the trained integer weights and activation ranges. ``hago qat``
(:mod:`.command`) is the command line.
"""

from .export import build_strategy, export, export_onnx, float_model
from .layers import QuantConfig, QuantLayer, quant_layers, quantize_model
from .quantizers import GRIDS, ActivationQuantizer, WeightQuantizer, round_ste
from .sam import SAQ, PlainQAT
from .train import METHODS, TrainConfig, logits_of, top1, train

__all__ = ["ActivationQuantizer", "GRIDS", "METHODS", "PlainQAT", "QuantConfig", "QuantLayer", "SAQ",
           "TrainConfig", "WeightQuantizer", "build_strategy", "export", "export_onnx", "float_model",
           "logits_of", "quant_layers", "quantize_model", "round_ste", "top1", "train"]
