"""``hago search`` end to end: engine + algorithm + outputs like ``hago compile``.

Writes the chosen build (``model.so``, ``strategy.json``, ``report.json``
through :func:`hago.compile`, given the prepared model the engine
already holds, so a search result is replayable with ``--strategy``), plus
``pareto.json`` and ``pareto.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .algorithms import ALGORITHMS
from .engine import SearchEngine, SearchResult
from .log import check_resumable
from .pareto import front, plot, table
from .target import KL_METRIC, SearchError


def _progress_hook(engine: SearchEngine, progress: Progress, task) -> None:
    """Advance the bar on every new latency measurement (the budget's unit); a farm's boards beside it."""
    status = getattr(engine.measurer, "status", None)

    def measured(c) -> None:
        text = f"measured {c.label}"
        if status is not None:
            s = status()
            text += f" | boards: {s['busy']} busy, {s['idle']} idle, {s['lost']} lost"
        progress.update(task, advance=1, description=text)

    engine.on_measured.append(measured)


def search(model, device, calib, eval_data, *, out_dir=None, algorithm="evolve", log_path=None,
           resume: bool = False, console: Console | None = None, **engine_options) -> SearchResult:
    """The fastest strategy for ``device`` that meets an accuracy target, measured on the device (``hago.search``).

    Candidates are scored by running the realized integer program here and
    timed on the device through a :class:`hago.measure.Measurer`; every
    measurement goes to a JSONL log first, so a killed search resumes and
    measures nothing twice. FP32 is always a measured candidate.

    Parameters
    ----------
    model : str | Path | torch.nn.Module | tvm.IRModule
        An ONNX file, a torch module (pass ``example_inputs=``) or a Relax module.
    device : str | HardwareSpec
        A spec name from ``hwspecs/`` (``hago devices``) or a loaded spec.
    calib : path | dict | iterable | callable
        Calibration samples keyed by input name (see :func:`hago.data.load_samples`).
    eval_data : same kinds as ``calib``
        The accuracy target's data: top-1 with a ``label`` array, top-1
        agreement with FP32 without one (or pass ``metric=``).
    out_dir : path, optional
        Where the chosen build is written as ``hago compile`` writes it
        (``model.so``, ``strategy.json``, ``report.json``), plus ``pareto.json``,
        ``pareto.png`` and, without ``log_path``, the log ``search.jsonl``.
    algorithm : str
        ``evolve`` (cost-model guided), ``latency`` or ``greedy``.
    log_path : path, optional
        The JSONL log; default ``OUT/search.jsonl``.
    resume : bool
        ``log_path`` must hold a search (``--resume LOG``): a missing or empty
        log is a one-line error, not a new search. Without it (``--log LOG``)
        a missing log is started, and an existing one continued.
    console : rich.console.Console, optional
        Where the progress bar goes (stderr by default).
    **engine_options
        :class:`~hago.search.engine.SearchEngine`'s keywords: ``accuracy_drop``
        (``"1%"`` relative, ``"0.5pt"`` absolute), ``max_trials``,
        ``time_budget`` (seconds), ``measurer`` (default: this machine, in a
        child with a time-out; an ``RPCMeasurer`` for a board), ``calibrator``,
        ``corrections``, ``example_inputs``, ``metric``, ``weight_bits``,
        ``allow_float``, ``cache_dir``, ``max_weight_bytes`` (a size budget:
        bytes, or text such as ``"2MB"``; a build whose realized weights take
        more is never chosen, and the algorithms steer towards builds within it),
        ``settle_rounds`` (default 3: the contenders for the answer re-timed
        side by side before the choice, :mod:`hago.search.settle`).

    Returns
    -------
    SearchResult
        ``best`` (None if nothing could be measured, or nothing fits ``max_weight_bytes``), ``met_target``,
        ``message``, ``strategy``, ``fp32`` and every ``candidates`` scored.

    Raises
    ------
    HagoError
        One line, before any long work where the problem can be seen up front
        (bad options, data, spec, log or tracker).
    """
    if algorithm not in ALGORITHMS:
        raise SearchError(f"unknown search algorithm {algorithm!r}; valid: {', '.join(sorted(ALGORITHMS))}")
    out = Path(out_dir) if out_dir else None
    if log_path is None:
        if resume:
            raise SearchError("resume needs the log of the search to resume (--resume LOG)")
        if out is None:
            raise SearchError("give -o OUT or --log LOG: the search log must live somewhere")
        log_path = out / "search.jsonl"
    if resume:
        check_resumable(log_path)  # before the engine's minutes of set-up
    console = console or Console(stderr=True)
    engine = SearchEngine(model, device, calib, eval_data, log_path=log_path, resume=resume, **engine_options)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} trials"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("searching", total=engine.max_trials)
        _progress_hook(engine, progress, task)
        result = engine.run(ALGORITHMS[algorithm])
    result.extras["engine"] = engine
    if out is not None and result.best is not None:
        write_search_outputs(engine, result, out)
    return result


def write_search_outputs(engine: SearchEngine, result: SearchResult, out: Path) -> None:
    """The chosen build, from the prepared model the engine holds (no reload of the model file)."""
    from ..compiler import compile as hago_compile

    out.mkdir(parents=True, exist_ok=True)
    built = hago_compile(engine.prepared, engine.spec, strategy=result.strategy, out_dir=out, measure=False)
    _scores_into_report(built.report, engine, result)
    pareto = front(result.candidates, engine.max_weight_bytes)
    report = built.report
    report["quantized"]["latency_ms"] = result.best.latency_ms
    if result.fp32 is not None:
        report["fp32"]["latency_ms"] = result.fp32.latency_ms
        if result.fp32.latency_ms and result.best.latency_ms:
            report["speedup"] = result.fp32.latency_ms / result.best.latency_ms
    report["search"] = {
        "met_target": result.met_target, "message": result.message, "threshold": result.threshold,
        "metric": engine.metric_name, "fp32_score": engine.fp32_score, "chosen": result.best.label,
        "chosen_score": result.best.accuracy, "trials": result.trials, "reused": result.reused,
        "retimed": engine.retimed,
        "seconds": round(result.seconds, 1), "log": str(engine.log.path),
        "max_weight_bytes": engine.max_weight_bytes, "weight_bytes": result.best.weight_bytes,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    rows = [{"strategy": c.label, "latency_ms": c.latency_ms, "score": c.accuracy, "weight_bytes": c.weight_bytes,
             "error": c.error} for c in result.candidates]
    (out / "pareto.json").write_text(json.dumps({"front": [c.label for c in pareto], "max_weight_bytes":
                                                 engine.max_weight_bytes, "candidates": rows}, indent=1))
    plot(result.candidates, pareto, result.best, result.threshold, out / "pareto.png", engine.metric_name,
         result.fp32, latency=engine.spec.latency)


def _scores_into_report(report: dict, engine: SearchEngine, result: SearchResult) -> None:
    """The engine already scored FP32 and the chosen build on the evaluation data: report those numbers."""
    report["eval_samples"] = len(engine.eval_samples)
    if engine.metric_name == "top-1":
        report["fp32"]["accuracy"], report["quantized"]["accuracy"] = engine.fp32_score, result.best.accuracy
    elif engine.metric_name == "top-1 agreement with FP32":
        report["agreement"] = result.best.accuracy
    elif engine.metric_name == KL_METRIC:
        report["mean_kl"] = -result.best.accuracy


def print_search(result: SearchResult, console: Console | None = None) -> None:
    console = console or Console()
    engine = result.extras["engine"]
    console.print(table(front(result.candidates, engine.max_weight_bytes), result.best, result.threshold,
                        engine.metric_name, latency=engine.spec.latency, max_weight_bytes=engine.max_weight_bytes))
    style = "green" if result.met_target else "bold red"
    console.print(f"[{style}]{result.message}[/]")
    console.print(f"{result.trials} device measurements this run, {result.reused} reused from the log, "
                  f"{result.seconds:.0f}s; space of {engine.space.size_text()} strategies")
