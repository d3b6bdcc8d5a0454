"""The correction interface, its registry, and the graph with corrected biases.

A correction is one class registered under a CLI name (``@register("bias")``)
with ``run(ctx)``; it may only write ``strategy.ops[node].bias_delta``, ``.weight_round``,
``.weight_scale`` (:mod:`hago.correct.weight_clip`), ``.weight_codes`` (:mod:`hago.correct.gptq`),
``.weight_scale_in`` and ``.multipoint`` (extra points, read by realize/simulate themselves), and (``lapq`` alone, :mod:`hago.correct.lapq`) the ``range`` and
``qparams`` of static activation edges that own their parameters (no alias, not
dynamic), keeping their bits, dtype and symmetry: realize reads those edge
parameters as it reads calibrated ones, so a replayed strategy bakes the same
clips. A correction that changes ranges runs before those that measure errors
under them (``lapq,bias``). Keeping
its output in the strategy (not in a modified model) leaves the FP32 graph and
its hash untouched, so the FP32 baseline and strategy replay stay exact.

A :class:`GraphCorrection` (``stage = "graph"``; cross-layer equalization) is
the one exception: it rewrites the prepared FP32 module's constants *before*
annotate and calibration, since it changes weights and activation ranges
both. It must leave the FP32 function unchanged (up to float rounding) and be
deterministic, so that a replayed strategy, which names it in
``strategy.corrections``, re-applies it to the same prepared model and finds
the same graph hash (:func:`hago.pipeline.apply_graph_corrections`). Graph
corrections run first, whatever their place in the list.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hago.correct import rounding
from hago.data import Samples
from hago.errors import QuantizeError
from hago.plugins import registrar
from hago.graph import Graph
from hago.strategy import Strategy

log = logging.getLogger(__name__)


@dataclass
class CorrectionContext:
    """What a correction may use: the prepared FP32 module, its graph, the calibrated
    strategy it edits, the calibration samples and the host target to run on."""

    fp32: object
    graph: Graph
    strategy: Strategy
    samples: Samples
    target: object
    batch_size: int = 64


class Correction(ABC):
    """One accuracy plug-in; ``run`` fills ``bias_delta`` and/or ``weight_round`` of the strategy's integer ops."""

    name: ClassVar[str]
    #: True when a layer's result depends only on that layer's own quantization (its weight bits and
    #: its input edge) and its FP32 input: a search may then compute it once and copy it to every
    #: candidate that quantizes the layer the same way (``hago.search.engine``)
    local: ClassVar[bool] = False
    #: True for a closed-form, data-free correction whose result depends on the *neighbours'* choices (DF-MPC:
    #: a low-bit layer compensated by the next, higher-bit one): a search cannot copy it by layer, but it costs
    #: next to nothing, so ``hago.search.engine`` runs it on every candidate's own strategy
    per_candidate: ClassVar[bool] = False
    #: True when it writes a layer's weights (``weight_round``, ``weight_codes``, ``weight_scale``): in
    #: ``hago compile``, such a correction after ``dfmpc`` works on (or refuses) the compensated layer, so a
    #: search, which runs ``dfmpc`` last, refuses that order rather than silently reversing it
    writes_weights: ClassVar[bool] = False
    #: ``strategy``: runs after calibration and writes into the strategy; ``graph``: a
    #: :class:`GraphCorrection`, rewrites the FP32 module before annotate and calibration
    stage: ClassVar[str] = "strategy"

    @abstractmethod
    def run(self, ctx: CorrectionContext) -> dict:
        """Apply the correction to ``ctx.strategy``; return a small report (numbers, for logs)."""


class GraphCorrection(Correction):
    """A plug-in that rewrites the prepared FP32 module's constants before calibration (``stage = "graph"``)."""

    stage = "graph"
    local = True  # applied once to the model every candidate shares

    @abstractmethod
    def rewrite(self, mod) -> tuple[object, dict]:
        """``(new module, report)``: ``mod`` (a prepared IRModule) with its constants rewritten."""

    def run(self, ctx: CorrectionContext) -> dict:
        raise QuantizeError(f"correction {self.name!r} rewrites the FP32 graph before calibration; it runs "
                            "through hago.pipeline.apply_graph_corrections, not after calibration")


CORRECTIONS: dict[str, type[Correction]] = {}


#: Class decorator: ``@register("bias")`` adds a correction to :data:`CORRECTIONS` under that name.
register = registrar(CORRECTIONS, "correction", QuantizeError)


def get_correction(name: str, **options) -> Correction:
    check_corrections([name])
    return CORRECTIONS[name](**options)


def check_corrections(names: Sequence[str]) -> None:
    """Fail before any work when a name is not registered."""
    for name in names:
        if name not in CORRECTIONS:
            raise QuantizeError(f"unknown correction {name!r}; valid: {', '.join(sorted(CORRECTIONS))}")


def graph_stage(names: Sequence[str]) -> list[str]:
    """The names among ``names`` that are graph corrections (:class:`GraphCorrection`), in order."""
    check_corrections(names)
    return [n for n in names if CORRECTIONS[n].stage == "graph"]


def run_corrections(names: Sequence[str], ctx: CorrectionContext) -> dict:
    """Run the named strategy-stage corrections in order; record them in ``ctx.strategy.corrections``.

    Graph corrections among ``names`` are skipped here: they ran on the module
    before calibration (the caller records them).
    """
    check_corrections(names)
    reports = {}
    for name in names:
        if CORRECTIONS[name].stage == "graph":
            continue
        corr = get_correction(name)
        reports[name] = corr.run(ctx)
        ctx.strategy.corrections.append(name)
        log.info("correction %s: %s", name, reports[name])
    return reports


def channels(node) -> int:
    return node.weight.shape[0] if node.kind != "dense" else node.weight.shape[1]


def scale_input_channels(node, w: np.ndarray, scale) -> np.ndarray:
    """``w`` (``node``'s weight layout) with input channel ``i``'s weights multiplied by ``scale[i]``.

    Input channels are those of the layer's input: ``C_in`` of a conv (all groups: a depthwise conv's
    channel ``i`` is its filter ``i``), ``K`` of a dense ``[K, N]``.
    """
    s = np.asarray(scale, np.float32)
    if node.kind == "dense":
        if s.shape != (w.shape[0],):
            raise QuantizeError(f"strategy's weight_scale_in for {node.name} does not fit the layer; "
                                "re-run hago compile")
        return (w * s[:, None]).astype(np.float32)
    groups = int(node.call.attrs.groups)
    out_ch, per_group = w.shape[:2]
    if s.shape != (per_group * groups,) or out_ch % groups:
        raise QuantizeError(f"strategy's weight_scale_in for {node.name} does not fit the layer; "
                            "re-run hago compile")
    group_of = np.arange(out_ch) // (out_ch // groups)
    per_out = s.reshape(groups, per_group)[group_of]  # [O, C_in / groups]
    return (w * per_out.reshape(out_ch, per_group, *[1] * (w.ndim - 2))).astype(np.float32)


def corrected_graph(graph: Graph, strategy: Strategy) -> Graph:
    """``graph`` with the strategy's corrections in its constants (the same graph if none).

    Every stored ``bias_delta`` is added to its node's bias (a layer without a
    bias gets the delta as its bias); a stored ``weight_scale_in``
    (:mod:`hago.correct.dfmpc`) multiplies the weights of each input channel
    (:func:`scale_input_channels`; not with a ``weight_round`` on the same layer,
    which was learned on the unscaled weights); a stored ``weight_round`` replaces the
    weights by ones already on their grid, rounded the learned way
    (:mod:`hago.correct.rounding`), and stored ``weight_codes`` by the codes times
    ``weight_scale`` (:mod:`hago.correct.gptq`). ``realize`` and ``simulate`` read
    ``node.bias`` and ``node.weight``, so both see the corrected values.
    """
    ops = {n: c for n, c in strategy.ops.items()
           if c.bias_delta is not None or c.weight_round is not None or c.weight_scale_in is not None
           or c.weight_codes is not None}
    if not ops:
        return graph
    nodes = []
    for node in graph.nodes:
        c = ops.get(node.name)
        if c is None:
            nodes.append(node)
            continue
        if not node.weighted:
            raise QuantizeError(f"strategy corrects {node.name}, which has no weights; re-run hago compile")
        changes = {}
        if c.weight_scale_in is not None and c.weight_round is not None:
            # adaround learns its rounding on the FP32 graph's weights, not on dfmpc's scaled ones
            raise QuantizeError(f"strategy has both dfmpc's weight_scale_in and a learned weight_round for "
                                f"{node.name}: they do not compose; run adaround before dfmpc (dfmpc then "
                                "leaves that layer alone) or only one of them")
        if c.weight_scale_in is not None:  # the scaled weight is what realize quantizes
            changes["weight"] = scale_input_channels(node, node.weight, c.weight_scale_in)
        if c.weight_codes is not None:  # gptq's integers, on weight_scale's grid
            changes["weight"] = rounding.coded_weight(node.kind, c.weight_bits, c.weight_codes, c.weight_scale,
                                                      node.weight.shape)
        if c.weight_round is not None:
            up = rounding.decode(c.weight_round, node.weight.shape)
            changes["weight"] = rounding.rounded_weight(node.weight, node.kind, c.weight_bits, up, c.weight_scale)
        if c.bias_delta is not None:
            d = np.asarray(c.bias_delta, np.float32)
            if d.shape != (channels(node),):
                raise QuantizeError(f"strategy's bias_delta for {node.name} does not fit the layer; "
                                    "re-run hago compile")
            base = node.bias if node.bias is not None else np.zeros_like(d)
            changes["bias"] = (base + d).astype(np.float32)
        nodes.append(dataclasses.replace(node, **changes))
    return dataclasses.replace(graph, nodes=nodes)
