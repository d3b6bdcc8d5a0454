"""Accuracy plug-ins that run after calibration and change the float constants realize bakes.

Calibration picks ranges; it cannot remove the *systematic* error that rounding
weights (and clipping activations) puts on a layer's output. A correction
measures that error on the calibration data and writes its fix into the
strategy (``OpChoice.bias_delta``), so ``realize`` and a replayed
``strategy.json`` produce the same integer program without re-running it:

* ``bias`` / ``bias_sequential`` -- empirical bias correction (Nagel et al. 2019, "Data-Free
  Quantization", sec. 4.2): per-channel mean output error of each quantized
  layer, subtracted from its bias (:mod:`hago.correct.bias`).
* ``adaround`` -- learned up/down rounding of the depthwise (or all conv)
  weights (Nagel et al. 2020; :mod:`hago.correct.adaround`), stored as one
  bit per weight in ``OpChoice.weight_round``; ``adaround_conv`` does every
  integer conv. Run it before ``bias``.

``corrected_graph(graph, strategy)`` is the graph whose biases include the
stored deltas and whose weights sit on their learned grid points; pass it to
``realize``/``simulate`` instead of the plain graph.
"""

from hago.correct.base import (CORRECTIONS, Correction, CorrectionContext, check_corrections, corrected_graph,
                               get_correction, register, run_corrections)
from hago.correct.adaround import AdaRound, AdaRoundConv
from hago.correct.bias import BiasCorrection, SequentialBiasCorrection

__all__ = ["CORRECTIONS", "AdaRound", "AdaRoundConv", "BiasCorrection", "Correction", "CorrectionContext",
           "SequentialBiasCorrection", "check_corrections", "corrected_graph", "get_correction", "register",
           "run_corrections"]
