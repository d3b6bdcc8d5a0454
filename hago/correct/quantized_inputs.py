"""Edge values from the quantized network so far, for corrections that learn layer after layer on them.

A local correction learns each block on its FP32 input. The reference code of
BRECQ (and QDrop, and GPTQ's sequential mode here) feeds each block the input
the *quantized* network gives it, with every earlier block's learned rounding
in place, so a block can undo some of the error that reaches it ("asymmetric
reconstruction": quantized input, FP32 target).

:class:`QuantizedInputs` builds the fake-quant twin (:func:`hago.simulate.simulate`)
once, with the learned layers' weights as run-time inputs
(``weight_inputs``) and the wanted edges as its outputs (``edge_taps``), so a
changed rounding costs one pass over the samples, not a rebuild. Each learned
layer starts at the rounding the strategy realizes now (an earlier correction's,
else round to nearest) and is updated with :meth:`set_rounding` as blocks are learned.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from hago import build as build_mod
from hago.correct import rounding
from hago.correct.adaround import vm_outputs
from hago.correct.base import CorrectionContext, corrected_graph


def rounding_in_place(ctx: CorrectionContext, name: str) -> np.ndarray:
    """The up/down bits the strategy realizes ``name`` with now: an earlier learned rounding, else nearest."""
    node, op = ctx.graph.node(name), ctx.strategy.ops[name]
    if op.weight_round is not None:
        return rounding.decode(op.weight_round, node.weight.shape)
    return rounding.nearest_up(node.weight, node.kind, op.weight_bits, op.weight_scale)


class QuantizedInputs:
    """``inputs(edges)``: those edges over the first ``max_samples`` samples, from the simulated quantized network.

    ``layers``: the integer weighted layers whose rounding will change (their
    weights become run-time inputs); ``edges``: every edge that will be asked for.
    """

    def __init__(self, ctx: CorrectionContext, layers: list[str], edges: list[str], max_samples: int,
                 label: str = "quantized inputs"):
        from hago.simulate import simulate

        self.ctx, self.layers, self.edges, self.max_samples = ctx, list(layers), list(edges), max_samples
        base = corrected_graph(ctx.graph, ctx.strategy)  # biases as corrected so far
        self.bs = max(1, min(ctx.batch_size, 8, len(ctx.samples)))
        mod = build_mod.static_batch(simulate(base, ctx.strategy, weight_inputs=self.layers, edge_taps=self.edges),
                                     self.bs)
        self.vm = relax.VirtualMachine(build_mod.build(mod, ctx.target, label), tvm.cpu())
        self.weights = {}
        for name in self.layers:
            self.set_rounding(name, rounding_in_place(ctx, name))

    def set_rounding(self, name: str, up: np.ndarray) -> None:
        """From now on ``name`` runs with the rounding ``up`` (one bit per weight: rounded up)."""
        node, op = self.ctx.graph.node(name), self.ctx.strategy.ops[name]
        self.weights[name] = np.ascontiguousarray(
            rounding.rounded_weight(node.weight, node.kind, op.weight_bits, up, op.weight_scale), np.float32)

    def inputs(self, edges: list[str]) -> dict[str, np.ndarray]:
        """The edges' tensors, as the next layers read them (fake-quantized where the strategy quantizes them)."""
        extra = [tvm.runtime.tensor(self.weights[n]) for n in self.layers]
        outs = vm_outputs(self.ctx, self.vm, self.bs, [self.edges.index(e) for e in edges], self.max_samples, extra)
        return dict(zip(edges, outs))
