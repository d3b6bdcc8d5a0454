"""The correction interface, its registry, and the graph with corrected biases.

A correction is one class registered under a CLI name (``@register("bias")``)
with ``run(ctx)``; it may only write ``strategy.ops[node].bias_delta``. Keeping
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
    """One accuracy plug-in; ``run`` fills ``bias_delta`` of the strategy's integer ops."""

    name: ClassVar[str]

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
    """``graph`` with every stored ``bias_delta`` added to its node's bias (the same graph if none).

    A layer without a bias gets the delta as its bias; ``realize`` and
    ``simulate`` read ``node.bias``, so both see the corrected values.
    """
    deltas = {n: c.bias_delta for n, c in strategy.ops.items() if c.bias_delta is not None}
    if not deltas:
        return graph
    nodes = []
    for node in graph.nodes:
        d = deltas.get(node.name)
        if d is None:
            nodes.append(node)
            continue
        d = np.asarray(d, np.float32)
        if not node.weighted or d.shape != (channels(node),):
            raise QuantizeError(f"strategy's bias_delta for {node.name} does not fit the layer; re-run hago compile")
        base = node.bias if node.bias is not None else np.zeros_like(d)
        nodes.append(dataclasses.replace(node, bias=(base + d).astype(np.float32)))
    return dataclasses.replace(graph, nodes=nodes)
