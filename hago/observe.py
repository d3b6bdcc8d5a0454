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
from .graph import Graph, with_main
from .qparams import activation_qparams
from .strategy import Strategy

log = logging.getLogger(__name__)


def range_sources(strategy: Strategy) -> dict[str, str]:
    """Map each quantized edge that owns parameters to the edge whose values set its range."""
    out = {}
    for edge, choice in strategy.edges.items():
        if choice.bits and choice.alias_of is None and not choice.dynamic:
            out[edge] = choice.observe_at or edge
    return out


def probe_module(mod: tvm.IRModule, graph: Graph, edges: list[str], *, with_output: bool = False) -> tvm.IRModule:
    """A copy of ``mod`` whose main returns the tensors of ``edges`` as a tuple.

    Every other function of ``mod`` is kept: ``main`` may call helpers the
    importer added (``call_tir`` of the PrimFuncs TVM's ONNX importer emits
    for ``Clip`` and ``Pad``). ``with_output`` appends the model's own output
    (as the tuple's last field), for a pass that needs both.
    """
    func = mod["main"]
    body = func.body
    vars_ = [graph.edge_var[e] for e in edges] + ([body.body] if with_output else [])
    tup = relax.Tuple(vars_)
    probe = relax.Var("hago_probe", relax.TupleType([v.ty for v in vars_]))
    blocks = list(body.blocks)
    last = blocks[-1]
    new_last = relax.DataflowBlock(list(last.bindings) + [relax.VarBinding(probe, tup)])
    new_body = relax.SeqExpr(blocks[:-1] + [new_last], probe)
    new_func = relax.Function(func.params, new_body, probe.ty, func.is_pure, func.attrs)
    return relax.transform.Normalize()(with_main(mod, new_func))


def observe(
    mod: tvm.IRModule,
    graph: Graph,
    samples: Samples,
    calibrator: Calibrator,
    target,
    batch_size: int = 64,
    edges: list[str] | None = None,
) -> None:
    """Feed every batch of ``samples`` through the FP32 probe into ``calibrator``.

    By default every edge of the graph is observed, under its own name, so one
    pass serves any strategy: which edges a strategy quantizes (and where a
    ReLU moves a range) is decided later, from the same statistics.
    """
    sources = sorted(edges if edges is not None else graph.edge_var)
    if not sources:
        return
    ex = tvm.compile(probe_module(mod, graph, sources), target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    input_names = [p.name for p in graph.params]
    for batch in samples.batches(batch_size):
        args = [tvm.runtime.tensor(np.ascontiguousarray(batch[n])) for n in input_names]
        outs = vm["main"](*args)
        for i, src in enumerate(sources):
            calibrator.observe(src, outs[i].numpy())
    log.info("observed %d edges over %d samples", len(sources), len(samples))


def apply_ranges(strategy: Strategy, calibrator: Calibrator) -> Strategy:
    """Fill every quantized edge of ``strategy`` with its range and parameters from ``calibrator``."""
    sources = range_sources(strategy)
    if not sources:
        return strategy
    bits = {src: strategy.edges[e].bits for e, src in sources.items()}
    sym = {src: strategy.edges[e].symmetric for e, src in sources.items()}
    ranges = calibrator.thresholds(bits=bits, symmetric=sym, names=sorted(set(sources.values())))
    for edge, src in sources.items():
        choice = strategy.edges[edge]
        r = ranges[src]
        choice.range = (float(r.lo), float(r.hi))
        choice.qparams = activation_qparams(r.lo, r.hi, choice.dtype, choice.bits, choice.symmetric)
    strategy.calibrator = calibrator.name
    return strategy
