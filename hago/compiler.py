"""compiler: model + calibration data + device -> integer build and report (``hago.compile``).

One strategy through the shared stages of :mod:`hago.pipeline` (load and
prepare, decide: annotate + calibrate + correct, lower: realize), then build
and measure. The FP32 build of the
same prepared graph is compiled and measured beside it, so every report
carries its own baseline and says when the integer build is not faster.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import build as build_mod
from .annotate import AnnotateConfig
from .correct import CORRECTIONS, check_corrections
from .data import Samples, check_labels, load_samples
from .errors import DataError
from .evaluate import agreement, predict, top1
from .graph import Graph
from .hwspec import HardwareSpec, check_target
from .measure import device_threads, measure_local, pool_threads
from .pipeline import (CALIB_BATCH, PreparedModel, apply_graph_corrections, check_strategy, decide, lower,
                       prepare_model, realized_program)
from .realize import Realized
from .strategy import Strategy
from .weight_bytes import weight_bytes

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    """What :func:`compile` produced; ``report`` is what ``report.json`` holds."""

    strategy: Strategy
    report: dict
    fp32_module: object
    realized: Realized
    fp32_executable: object = None
    int_executable: object = None
    out_dir: Path | None = None
    graph: Graph | None = None
    quantized: "Quantized | None" = None
    extras: dict = field(default_factory=dict)


#: Corrections ``compile`` (and ``hago compile``) run when none are named. Evidence (docs/STATUS.md):
#: EfficientNet-Lite0 top-1 agreement 83.7% -> 88.7%, mean KL 0.049 -> 0.022; MNIST unchanged.
DEFAULT_CORRECTIONS: tuple[str, ...] = ("bias",)


@dataclass
class Quantized:
    """A prepared model, its strategy and the realized integer program, before any build."""

    prepared: PreparedModel
    strategy: Strategy
    realized: Realized

    # the prepared model's facts, read through: callers name them on the quantized model
    fp32 = property(lambda self: self.prepared.fp32)
    graph = property(lambda self: self.prepared.graph)
    inputs = property(lambda self: self.prepared.inputs)
    graph_hash = property(lambda self: self.prepared.graph_hash)
    declared_batch = property(lambda self: self.prepared.declared_batch)
    fixed_batch = property(lambda self: self.prepared.fixed_batch)
    notes = property(lambda self: self.prepared.notes)

    def batch_for(self, wanted: int) -> int:
        return self.prepared.batch_for(wanted)


def quantize(
    model,
    device: str | HardwareSpec,
    calib=None,
    *,
    strategy: Strategy | str | Path | None = None,
    calibrator: str = "mse",
    example_inputs=None,
    annotate_config: AnnotateConfig | None = None,
    batch_size: int = CALIB_BATCH,
    corrections: list[str] | tuple[str, ...] = (),
) -> Quantized:
    """frontend -> prepare -> annotate -> calibrate -> correct -> realize, without building.

    ``model`` may also be a :class:`~hago.pipeline.PreparedModel` (the search
    hands over the one it holds; ``calib`` is then ignored). Calibration runs
    on this machine (the host target) whatever the device, so cross-compiled
    and GPU devices are calibrated on the same FP32 program. ``corrections``
    names :mod:`hago.correct` plug-ins run after calibration (none by default
    here: this is the stage function; :func:`compile` and the CLI default to
    :data:`DEFAULT_CORRECTIONS`). A replayed strategy carries their results
    and runs none, except the graph corrections it names (``cle``), which
    rewrite the FP32 weights before calibration and are re-applied to the
    model (deterministically) so that its graph hash matches.
    """
    spec = device if isinstance(device, HardwareSpec) else HardwareSpec.load(device)
    check_target(spec)  # an mcpu LLVM does not know: one line now, not 91 LLVM lines and a generic build later
    names = (corrections,) if isinstance(corrections, str) else tuple(corrections)
    check_corrections(names)
    if strategy is None and calib is None and not isinstance(model, PreparedModel):
        raise DataError("calibration data is required (--calib DATA) unless a --strategy is replayed")
    prepared = model if isinstance(model, PreparedModel) else prepare_model(model, calib, example_inputs=example_inputs)
    if strategy is not None:
        strat = strategy if isinstance(strategy, Strategy) else Strategy.load(strategy)
        prepared = apply_graph_corrections(prepared, [n for n in strat.corrections if n in CORRECTIONS])
        check_strategy(strat, prepared, spec)
    else:
        prepared = apply_graph_corrections(prepared, names)
        host = build_mod.target_of(spec) if spec.is_local else build_mod.host_target()
        strat = decide(prepared, spec, host, calibrator=calibrator, corrections=names, config=annotate_config,
                       batch_size=batch_size)
    return Quantized(prepared, strat, realized_program(prepared, strat, spec))


def compile(  # noqa: A001 - mirrors the CLI verb, as tvm.compile does
    model,
    device: str | HardwareSpec,
    calib=None,
    *,
    eval_data=None,
    out_dir: str | Path | None = None,
    strategy: Strategy | str | Path | None = None,
    calibrator: str = "mse",
    example_inputs=None,
    annotate_config: AnnotateConfig | None = None,
    batch_size: int = CALIB_BATCH,
    batch: int | None = None,
    measure: bool = True,
    measurer=None,
    tune=None,
    corrections: list[str] | tuple[str, ...] | None = None,
) -> CompileResult:
    """Quantize ``model`` for ``device`` and build it.

    Parameters
    ----------
    model : str | Path | torch.nn.Module | tvm.IRModule
        An ONNX file, a torch module (needs ``example_inputs``) or a Relax module.
    device : str | HardwareSpec
        A spec name from ``hwspecs/`` (``hago devices``) or a loaded spec.
    calib : path | dict | iterable | callable
        Calibration samples keyed by input name (see :func:`hago.data.load_samples`).
        Not needed when ``strategy`` is given.
    eval_data : same kinds as ``calib``, optional
        With a ``label`` array the report gives top-1 accuracy; without one,
        top-1 agreement of the integer build with FP32.
    out_dir : path, optional
        Where ``model.so``, ``strategy.json`` and ``report.json`` are written.
    strategy : Strategy | path, optional
        Replay a saved strategy instead of annotating and calibrating.
    calibrator : str
        ``minmax``, ``percentile``, ``kl`` or ``mse``.
    corrections : list of str, optional
        Accuracy plug-ins after calibration (``bias``: empirical bias
        correction); ``None`` runs :data:`DEFAULT_CORRECTIONS`, ``[]`` none.
    batch : int, optional
        The batch size the exported build is compiled for (its inputs are
        static). Default: the batch the model file declares (the model's own
        input signature), or 1 when it declares a symbolic one. A model whose
        graph depends on its static batch can be built only for that batch.
    measurer : hago.measure.Measurer, optional
        How to time builds on a device that is not this machine (e.g. an
        ``RPCMeasurer`` for a board behind a tracker).
    tune : hago.tune.TuneOptions, optional
        MetaSchedule tuning with cached records; FP32 and integer builds get
        the same per-task budget so their ratio is fair.

    Returns
    -------
    CompileResult
        ``report`` (what ``report.json`` holds: latency and accuracy of FP32
        and the integer build, op counts, notes), ``strategy``, the
        executables and the realized program.

    Raises
    ------
    HagoError
        One line naming the problem (model, data, spec, strategy, build or
        measurement) and the fix.
    """
    t0 = time.perf_counter()
    spec = device if isinstance(device, HardwareSpec) else HardwareSpec.load(device)
    if measure and spec.is_local:
        device_threads(spec.cores)  # before quantize: calibration starts TVM's thread pool
    q = quantize(model, spec, calib, strategy=strategy, calibrator=calibrator, example_inputs=example_inputs,
                 annotate_config=annotate_config, batch_size=batch_size,
                 corrections=DEFAULT_CORRECTIONS if corrections is None else corrections)
    fp32, graph, strat, realized, ghash = q.fp32, q.graph, q.strategy, q.realized, q.graph_hash
    batch = _build_batch(q, batch)
    eval_samples = None if eval_data is None else _eval_samples(eval_data, q)  # bad labels fail before builds
    target = build_mod.target_of(spec)
    host_target = target if spec.is_local else build_mod.host_target()
    t_quant = time.perf_counter() - t0

    result = CompileResult(strat, {}, fp32, realized, out_dir=Path(out_dir) if out_dir else None, graph=graph,
                           quantized=q)
    fp32_static, int_static = static_pair(q, spec, batch)
    result.fp32_executable = build_mod.build_for(fp32_static, spec, tune=tune)  # the backend's kernel swap and build
    int_device = build_mod.device_module(int_static, spec)  # the weights as they ship (ARM packs 4-bit here)
    result.int_executable = build_mod.build_for(int_device, spec, tune=tune, rewritten=True)
    report = _base_report(spec, graph, strat, ghash, calibrator, t_quant)
    report["batch"] = batch
    report["fp32"]["weight_bytes"] = weight_bytes(fp32_static)  # 4-bit layers' packed weights show here
    report["quantized"]["weight_bytes"] = weight_bytes(int_device)
    report["notes"].extend(q.notes)
    if measure and measurer is not None:  # the user's choice wins, on a local device too (a server over RPC)
        _measure_remote(result, report, spec, measurer, q, batch)
    elif measure and spec.is_local:
        params = list(fp32["main"].params)
        for key, ex in (("fp32", result.fp32_executable), ("quantized", result.int_executable)):
            m = measure_local(ex, params, batch=batch)
            report[key]["latency_ms"] = m.latency_ms
            if m.error:
                report[key]["error"] = m.error
        report["threads"] = pool_threads()
        _speed_verdict(report)
    elif not spec.is_local:
        report["notes"].append(f"{spec.name} is not this machine: latency was not measured (use --rpc)")
    if eval_samples is not None:
        _evaluate(result, report, eval_samples, q, spec, host_target)
    result.report = report
    if out_dir is not None:
        write_outputs(result, spec)
    log.info("compiled for %s in %.1fs", spec.name, time.perf_counter() - t0)
    return result


def _build_batch(q: Quantized, batch: int | None) -> int:
    """The batch to build for: the caller's, else the model's own; a graph fixed to one batch takes only it."""
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise DataError(f"batch must be a positive integer, got {batch!r}")
    if q.fixed_batch is not None:
        if batch is not None and batch != q.fixed_batch:
            raise DataError(f"the model's graph is fixed to a batch of {q.fixed_batch} (its file bakes the batch "
                            f"into its shapes); it cannot be built for a batch of {batch}: re-export it with a "
                            f"dynamic batch")
        return q.fixed_batch
    return batch if batch is not None else (q.declared_batch or 1)


def _measure_remote(result, report, spec, measurer, q, batch) -> None:
    """Export both builds and time them on the device through ``measurer``."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="hago_remote_"))
    inputs = [([d if d is not None else batch for d in i.shape], i.dtype) for i in q.inputs]
    for key, ex in (("fp32", result.fp32_executable), ("quantized", result.int_executable)):
        lib = build_mod.export(ex, spec, tmp / f"{key}.so")
        m = measurer.measure(lib, inputs)
        report[key]["latency_ms"] = m.latency_ms
        if m.error:
            report[key]["error"] = m.error
            report["notes"].append(f"{key} measurement on {spec.name} failed: {m.error}")
    _speed_verdict(report)


def static_pair(q: Quantized, spec: HardwareSpec, batch: int):
    """FP32 and realized integer modules with the batch dimension bound to ``batch``.

    A graph already fixed to that batch reuses the program :func:`quantize` realized.
    """
    if build_mod.static_batch(q.fp32, batch) is q.fp32:
        return q.fp32, q.realized.mod
    fp32, realized = lower(q.prepared, q.strategy, spec, batch)
    return fp32, realized.mod


EVAL_BATCH = 250


def _base_report(spec, graph: Graph, strat: Strategy, ghash: str, calibrator: str, t_quant: float) -> dict:
    float_ops = [
        {"name": n, "kind": c.kind, "reason": c.reason} for n, c in strat.ops.items() if c.mode == "float"
    ]
    return {
        "device": spec.name,
        "graph_hash": ghash,
        "calibrator": strat.calibrator or calibrator,
        "corrections": list(strat.corrections),
        "fp32": {"latency_ms": None},
        "quantized": {"latency_ms": None},
        "ops": {"integer": len(strat.integer_ops()), "bf16": len(strat.bf16_ops()), "float": len(strat.float_ops())},
        "float_ops": float_ops,
        "quantize_seconds": round(t_quant, 2),
        "notes": [],
        # "modelled": the spec's device is simulated here, so every latency printed for it says so
        "latency": getattr(spec, "latency", "measured"),
    }


def _speed_verdict(report: dict) -> None:
    f, q = report["fp32"].get("latency_ms"), report["quantized"].get("latency_ms")
    if f and q:
        report["speedup"] = f / q
        if q > f and report.get("latency") != "modelled":  # a simulated device's times say nothing of its speed
            report["notes"].append(
                f"the quantized build is {q / f:.2f}x SLOWER than FP32 on this device (untuned kernels?)"
            )


def _eval_samples(eval_data, q: Quantized) -> Samples:
    """Evaluation data checked against the model, labels against its number of classes when that is static."""
    samples = load_samples(eval_data, q.inputs, name="evaluation")
    classes = _output_classes(q.fp32)
    if samples.labels is not None and classes is not None:
        samples.labels = check_labels(samples.labels, classes, "evaluation")
    return samples


def _output_classes(mod) -> int | None:
    """The last dim of ``main``'s single tensor output, when it is a known integer."""
    ret = mod["main"].ret_ty
    shape = getattr(ret, "shape", None)
    dims = getattr(shape, "values", None) if shape is not None else None
    if not dims:
        return None
    last = dims[-1]
    return int(last.value) if hasattr(last, "value") else None


def _evaluate(result: CompileResult, report: dict, samples: Samples, q: Quantized, spec, host_target) -> None:
    names = q.prepared.input_names
    eval_batch = q.batch_for(EVAL_BATCH)
    fp32_mod, int_mod = static_pair(q, spec, eval_batch)
    fp_ex = build_mod.build(fp32_mod, host_target, "host")
    q_ex = build_mod.build(int_mod, host_target, "host")
    ref = predict(fp_ex, samples, names, eval_batch, static=True)
    out = predict(q_ex, samples, names, eval_batch, static=True)
    report["agreement"] = agreement(out, ref)
    if samples.labels is not None:
        samples.labels = check_labels(samples.labels, ref.shape[-1], "evaluation")  # outputs whose width was symbolic
        report["fp32"]["accuracy"] = top1(ref, samples.labels)
        report["quantized"]["accuracy"] = top1(out, samples.labels)
    report["eval_samples"] = len(samples)
    result.extras["eval_outputs"] = {"fp32": ref, "quantized": out}


def write_outputs(result: CompileResult, spec: HardwareSpec) -> None:
    """``model.so`` (the integer build), ``strategy.json`` and ``report.json`` under ``out_dir``."""
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    build_mod.export(result.int_executable, spec, out / "model.so")
    result.strategy.save(out / "strategy.json")
    (out / "report.json").write_text(json.dumps(result.report, indent=1, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)
