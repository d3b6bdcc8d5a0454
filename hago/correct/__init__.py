"""Accuracy plug-ins that run after calibration and change the float constants realize bakes.

Calibration picks ranges; it cannot remove the *systematic* error that rounding
weights (and clipping activations) puts on a layer's output. A correction
measures that error on the calibration data and writes its fix into the
strategy (``OpChoice.bias_delta``), so ``realize`` and a replayed
``strategy.json`` produce the same integer program without re-running it:

* ``bias`` / ``bias_sequential`` -- empirical bias correction (Nagel et al. 2019, "Data-Free
  Quantization", sec. 4.2): per-channel mean output error of each quantized
  layer, subtracted from its bias (:mod:`hago.correct.bias`).
* ``weight_clip`` -- each output channel's weight step chosen by least Lp rounding
  error (BRECQ's weight-quantizer initialisation; :mod:`hago.correct.weight_clip`),
  stored in ``OpChoice.weight_scale``. Run it first: the learned roundings sit on its grid.
* ``gptq`` -- each layer's integer weights rounded one input column at a time, the
  error fed forward onto the columns left through the inverse of the inputs' second
  moments (Frantar et al. 2023; :mod:`hago.correct.gptq`), on an output-aware step;
  stored as ``OpChoice.weight_codes`` and ``.weight_scale``. Run ``bias`` after it.
  ``gptq_sequential`` refits each layer in turn on the input the quantized network
  gives it (not local: ``hago compile`` only).
* ``adaround`` -- learned up/down rounding of the depthwise (or all conv)
  weights (Nagel et al. 2020; :mod:`hago.correct.adaround`), stored as one
  bit per weight in ``OpChoice.weight_round``; ``adaround_conv`` does every
  integer conv. Run it before ``bias``.
* ``brecq`` -- block reconstruction (Li et al. 2021; :mod:`hago.correct.brecq`):
  AdaRound's learned rounding, learned jointly for the layers of each residual
  or inverted-residual block or transformer sublayer (:mod:`hago.correct.blocks`)
  on the block's output, single layers elsewhere; stored like AdaRound's. Run it
  before ``bias``. ``brecq_fisher`` weighs the block's output error by the
  gradient of the network's KL (the paper's diagonal-Fisher loss); ``brecq_lsq``
  then learns each block's activation steps (LSQ; changes edges, so not local).
* ``cle`` -- cross-layer equalization (Nagel et al. 2019, sec. 4.1;
  :mod:`hago.correct.cle`): a *graph* correction that rescales conv/dense
  pairs through ReLU in the FP32 weights before annotate and calibration,
  leaving the FP32 function unchanged.
* ``bias_data_free`` -- the paper's analytic bias correction
  (:mod:`hago.correct.bias_data_free`): ``(W_q - W) E[x]`` with ``E[x]``
  from the folded batch norms' statistics, no data.

* ``dfmpc`` -- data-free mixed-precision compensation (after Chen et al. 2023;
  :mod:`hago.correct.dfmpc`): a low-bit layer's weight error absorbed by the
  next, higher-bit layer through ReLU, as per-input-channel weight scales
  (``OpChoice.weight_scale_in``) and a bias shift, in closed form from the
  batch-norm statistics.

* ``multipoint`` -- multipoint quantization (Liu et al. 2020, arXiv 2002.09049;
  :mod:`hago.correct.multipoint`, :mod:`hago.multipoint`): the output channels with
  the largest output error get extra low-bit points (``OpChoice.multipoint``),
  realized as extra output channels of the layer's kernel plus a weighted sum
  before the requantize. Run it before ``bias``.

``corrected_graph(graph, strategy)`` is the graph whose biases include the
stored deltas and whose weights sit on their learned grid points; pass it to
``realize``/``simulate`` instead of the plain graph.
"""

from hago.correct.base import (CORRECTIONS, Correction, CorrectionContext, GraphCorrection, check_corrections,
                               corrected_graph, get_correction, graph_stage, register, run_corrections)
from hago.correct.adaround import AdaRound, AdaRoundConv
from hago.correct.brecq import Brecq, BrecqFisher, BrecqLsq
from hago.correct.bias import BiasCorrection, SequentialBiasCorrection
from hago.correct.bias_data_free import DataFreeBiasCorrection
from hago.correct.cle import CrossLayerEqualization
from hago.correct.dfmpc import DataFreeMixedPrecisionCompensation
from hago.correct.gptq import Gptq, GptqSequential
from hago.correct.lapq import Lapq
from hago.correct.multipoint import Multipoint
from hago.correct.weight_clip import WeightClip

__all__ = ["CORRECTIONS", "AdaRound", "AdaRoundConv", "BiasCorrection", "Brecq", "BrecqFisher", "BrecqLsq", "Correction", "CorrectionContext",
           "CrossLayerEqualization", "DataFreeBiasCorrection",
           "DataFreeMixedPrecisionCompensation", "GraphCorrection", "Gptq", "GptqSequential", "Lapq", "Multipoint", "SequentialBiasCorrection",
           "WeightClip", "check_corrections", "corrected_graph", "get_correction", "graph_stage", "register", "run_corrections"]
