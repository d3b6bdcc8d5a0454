"""The correction interface, its registry, and the graph with corrected biases.

A correction is one class registered under a CLI name (``@register("bias")``)
with ``run(ctx)``; it may only write ``strategy.ops[node].bias_delta`` and ``.weight_round``. Keeping
its output in the strategy (not in a modified model) leaves the FP32 graph and
its hash untouched, so the FP32 baseline and strategy replay stay exact.
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

    @abstractmethod
    def run(self, ctx: CorrectionContext) -> dict:
        """Apply the correction to ``ctx.strategy``; return a small report (numbers, for logs)."""


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


def run_corrections(names: Sequence[str], ctx: CorrectionContext) -> dict:
    """Run the named corrections in order; record them in ``ctx.strategy.corrections``."""
    reports = {}
    for name in names:
        corr = get_correction(name)
        reports[name] = corr.run(ctx)
        ctx.strategy.corrections.append(name)
        log.info("correction %s: %s", name, reports[name])
    return reports


def channels(node) -> int:
    return node.weight.shape[0] if node.kind != "dense" else node.weight.shape[1]


def corrected_graph(graph: Graph, strategy: Strategy) -> Graph:
    """``graph`` with the strategy's corrections in its constants (the same graph if none).

    Every stored ``bias_delta`` is added to its node's bias (a layer without a
    bias gets the delta as its bias); a stored ``weight_round`` replaces the
    weights by ones already on their grid, rounded the learned way
    (:mod:`hago.correct.rounding`). ``realize`` and ``simulate`` read
    ``node.bias`` and ``node.weight``, so both see the corrected values.
    """
    ops = {n: c for n, c in strategy.ops.items() if c.bias_delta is not None or c.weight_round is not None}
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
        if c.weight_round is not None:
            up = rounding.decode(c.weight_round, node.weight.shape)
            changes["weight"] = rounding.rounded_weight(node.weight, node.kind, c.weight_bits, up)
        if c.bias_delta is not None:
            d = np.asarray(c.bias_delta, np.float32)
            if d.shape != (channels(node),):
                raise QuantizeError(f"strategy's bias_delta for {node.name} does not fit the layer; "
                                    "re-run hago compile")
            base = node.bias if node.bias is not None else np.zeros_like(d)
            changes["bias"] = (base + d).astype(np.float32)
        nodes.append(dataclasses.replace(node, **changes))
    return dataclasses.replace(graph, nodes=nodes)
