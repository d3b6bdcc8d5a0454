"""The stages every route shares: a model is loaded and prepared once, then calibrated, decided and lowered.

``hago compile`` (one strategy) and ``hago search`` (many candidates) used to
stitch the same chain each on its own, load -> prepare -> analyze -> hash ->
observe -> ranges -> corrections -> realize, and the search then ran all of
``compile`` again from the model file to write its outputs. Here the chain is
written once:

- :func:`prepare_model` imports, prepares and analyzes a model and settles
  its sizes (:mod:`hago.batching`): a :class:`PreparedModel`. Everything
  downstream takes it, so a search hands the model it already holds to
  :func:`hago.compile` instead of reloading the file;
- :func:`apply_graph_corrections` runs the graph corrections
  (:class:`~hago.correct.GraphCorrection`: ``cle``) on the prepared FP32
  module, before anything is annotated or calibrated: a new
  :class:`PreparedModel` (new weights, new graph hash) that remembers them;
- :func:`calibrate` fills a strategy's ranges from one FP32 pass;
- :func:`decide` is annotate (the spec's choices) plus calibration plus the
  correction plug-ins: a complete :class:`~hago.strategy.Strategy`;
- :func:`lower` realizes a strategy for one batch, FP32 beside it.

Calibration and corrections always run on this machine (the host target),
whatever the device, so cross-compiled and GPU devices are calibrated on the
same FP32 program.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from .annotate import AnnotateConfig, annotate
from .backends import backend_of
from .batching import bind_calibration_dims, whole_batches
from .calibrate import get_calibrator
from .correct import CorrectionContext, check_corrections, corrected_graph, get_correction, graph_stage, run_corrections
from .data import InputInfo, Samples, load_samples
from .errors import DataError, QuantizeError
from .frontend import fixed_batch, import_model, input_infos
from .graph import Graph, analyze, graph_hash
from .hwspec import HardwareSpec
from .observe import apply_ranges, observe, range_sources
from .prepare import prepare
from .realize import Realized, realize
from .strategy import Strategy

log = logging.getLogger(__name__)

__all__ = ["PreparedModel", "prepare_model", "apply_graph_corrections", "calibrate", "decide", "lower",
           "check_strategy", "CALIB_BATCH"]

#: Samples per calibration pass for a graph with a symbolic batch.
CALIB_BATCH = 64


@dataclass
class PreparedModel:
    """A model imported, prepared and analyzed once: what every later stage reads.

    ``declared_batch`` is the batch the file declared (the default build
    batch); ``fixed_batch`` is set when the graph depends on it (then every
    run uses it); ``calib`` is the calibration data, trimmed to whole batches
    of a fixed batch; ``notes`` are one-line facts for the report; ``rewrites``
    the graph corrections already applied to ``fp32`` (:func:`apply_graph_corrections`).
    """

    fp32: object
    graph: Graph
    graph_hash: str
    inputs: list[InputInfo]
    declared_batch: int | None = None
    fixed_batch: int | None = None
    calib: Samples | None = None
    notes: list[str] = field(default_factory=list)
    rewrites: tuple[str, ...] = ()

    def batch_for(self, wanted: int) -> int:
        """``wanted``, unless the graph is fixed to another batch (then that one)."""
        return self.fixed_batch or wanted

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]


def prepare_model(model, calib=None, *, example_inputs=None) -> PreparedModel:
    """Import and prepare ``model`` (a path, torch module or IRModule) and load ``calib`` against it.

    Symbolic sizes other than the batch are bound from ``calib`` (a one-line
    error without it); a graph fixed to a static batch gets its calibration
    data trimmed to whole batches.
    """
    imported = import_model(model, example_inputs=example_inputs)
    fp32 = prepare(imported.mod)
    notes = list(imported.notes)
    samples = None if calib is None else load_samples(calib, input_infos(fp32), name="calibration")
    if samples is not None:
        notes.extend(samples.notes)
    fp32, bound = bind_calibration_dims(fp32, samples)
    if bound:
        notes.append("symbolic input dims bound from the calibration data: "
                     + ", ".join(f"{k}={v}" for k, v in bound.items()))
    infos = input_infos(fp32)
    fixed = fixed_batch(infos)
    if samples is not None:
        samples = whole_batches(samples, fixed, "calibration")
    return PreparedModel(fp32, analyze(fp32), graph_hash(fp32), infos, imported.declared_batch, fixed, samples,
                         notes)


def apply_graph_corrections(prepared: PreparedModel, names) -> PreparedModel:
    """``prepared`` with the graph corrections among ``names`` applied to its FP32 module, in order.

    Strategy-stage names are ignored here, and so are graph corrections it
    already had (``prepared.rewrites``), so calling it twice, or on the model
    a search hands over, changes nothing. Each is deterministic: a replayed
    strategy that names one gets the same graph hash (:func:`check_strategy`).
    """
    todo = [n for n in graph_stage(tuple(names)) if n not in prepared.rewrites]
    if not todo:
        return prepared
    fp32, notes = prepared.fp32, list(prepared.notes)
    for name in todo:
        fp32, report = get_correction(name).rewrite(fp32)
        log.info("correction %s: %s", name, report)
        notes.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    return dataclasses.replace(prepared, fp32=fp32, graph=analyze(fp32), graph_hash=graph_hash(fp32), notes=notes,
                               rewrites=prepared.rewrites + tuple(todo))


def calibrate(prepared: PreparedModel, strategy: Strategy, calibrator: str, target,
              batch_size: int = CALIB_BATCH) -> Strategy:
    """Observe the FP32 program on the calibration data and fill ``strategy``'s ranges."""
    if prepared.calib is None:
        raise DataError("calibration data is required (--calib DATA) unless a --strategy is replayed")
    cal = get_calibrator(calibrator)
    observe(prepared.fp32, prepared.graph, prepared.calib, cal, target, prepared.batch_for(batch_size),
            edges=sorted(set(range_sources(strategy).values())))
    return apply_ranges(strategy, cal)


def decide(prepared: PreparedModel, spec: HardwareSpec, target, *, calibrator: str = "mse",
           corrections: tuple[str, ...] = (), config: AnnotateConfig | None = None,
           batch_size: int = CALIB_BATCH) -> Strategy:
    """Annotate for ``spec``, calibrate, and run the correction plug-ins: a complete strategy.

    Graph corrections among ``corrections`` must already be applied to ``prepared``
    (:func:`apply_graph_corrections`); the strategy records them first.
    """
    check_corrections(corrections)
    missing = [n for n in graph_stage(corrections) if n not in prepared.rewrites]
    if missing:
        raise QuantizeError(f"correction {missing[0]} rewrites the FP32 graph: apply it before deciding "
                            "(hago.pipeline.apply_graph_corrections)")
    strat = annotate(prepared.graph, spec, prepared.graph_hash, config)
    strat.corrections.extend(prepared.rewrites)
    calibrate(prepared, strat, calibrator, target, batch_size)
    run_corrections(corrections, CorrectionContext(prepared.fp32, prepared.graph, strat, prepared.calib, target,
                                                   prepared.batch_for(batch_size)))
    return strat


def check_strategy(strategy: Strategy, prepared: PreparedModel, spec: HardwareSpec) -> None:
    """A replayed strategy must be for this graph; another device is allowed, with a warning."""
    if strategy.graph_hash != prepared.graph_hash:
        raise QuantizeError(f"strategy is for graph {strategy.graph_hash}, this model is {prepared.graph_hash}; "
                            f"re-run without --strategy")
    if strategy.device != spec.name:
        log.warning("strategy was made for %s, replaying it on %s", strategy.device, spec.name)


def lower(prepared: PreparedModel, strategy: Strategy, spec: HardwareSpec, batch: int | None = None):
    """``(fp32 module, Realized)`` for ``batch`` (None: the symbolic-batch graph itself).

    Realize runs on the batch-bound graph (same node names, same strategy), so
    the layout-specific kernels, which tile exact shapes, can be chosen.
    """
    from . import build as build_mod

    fp32 = prepared.fp32 if batch is None else build_mod.static_batch(prepared.fp32, batch)
    graph = prepared.graph if fp32 is prepared.fp32 else analyze(fp32)
    return fp32, realize(corrected_graph(graph, strategy), strategy, spec.requantize, backend_of(spec))


def realized_program(prepared: PreparedModel, strategy: Strategy, spec: HardwareSpec) -> Realized:
    """The realized integer program on the prepared (symbolic-batch) graph."""
    return lower(prepared, strategy, spec)[1]
