"""Run the FP32 program and hand every edge that needs a range to a calibrator.

Calibration needs intermediate tensors, which Relax keeps inside the dataflow
block. :func:`probe_module` appends one binding that gathers the wanted edges
into a tuple and returns it, so a single compiled program yields all of them
per batch. The calibrator sees each batch once and keeps bounded statistics;
nothing here stores activations across batches.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax

from .calibrate import Calibrator
from .data import Samples
from .graph import Graph
from .strategy import Strategy

log = logging.getLogger(__name__)


def edges_to_observe(graph: Graph, strategy: Strategy) -> dict[str, str]:
    """Map each quantized edge that owns parameters to the edge whose values set its range."""
    out = {}
    for edge, choice in strategy.edges.items():
        if choice.bits and choice.alias_of is None:
            out[edge] = choice.observe_at or edge
    return out


def probe_module(mod: tvm.IRModule, graph: Graph, edges: list[str]) -> tvm.IRModule:
    """A copy of ``mod`` whose main returns the tensors of ``edges`` as a tuple."""
    func = mod["main"]
    body = func.body
    vars_ = [graph.edge_var[e] for e in edges]
    tup = relax.Tuple(vars_)
    probe = relax.Var("hago_probe", relax.TupleType([v.ty for v in vars_]))
    blocks = list(body.blocks)
    last = blocks[-1]
    new_last = relax.DataflowBlock(list(last.bindings) + [relax.VarBinding(probe, tup)])
    new_body = relax.SeqExpr(blocks[:-1] + [new_last], probe)
    new_func = relax.Function(func.params, new_body, probe.ty, func.is_pure, func.attrs)
    return relax.transform.Normalize()(tvm.IRModule({"main": new_func}))


def observe(
    mod: tvm.IRModule,
    graph: Graph,
    strategy: Strategy,
    samples: Samples,
    calibrator: Calibrator,
    target,
    batch_size: int = 64,
) -> None:
    """Feed every batch of ``samples`` through the FP32 probe into ``calibrator``."""
    wanted = edges_to_observe(graph, strategy)
    if not wanted:
        return
    sources = sorted(set(wanted.values()))
    ex = tvm.compile(probe_module(mod, graph, sources), target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    input_names = [p.name for p in graph.params]
    for batch in samples.batches(batch_size):
        args = [tvm.runtime.tensor(np.ascontiguousarray(batch[n])) for n in input_names]
        outs = vm["main"](*args)
        values = {src: outs[i].numpy() for i, src in enumerate(sources)}
        for edge, src in wanted.items():
            calibrator.observe(edge, values[src])
    log.info("observed %d edges over %d samples", len(wanted), len(samples))
