"""``hago search`` end to end: engine + algorithm + outputs like ``hago compile``.

Writes the chosen build (``model.so``, ``strategy.json``, ``report.json``
through :func:`hago.compile.compile`, given the prepared model the engine
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
from .target import SearchError


def _progress_hook(engine: SearchEngine, progress: Progress, task) -> None:
    """Advance the bar on every new latency measurement (the budget's unit)."""
    original = engine.latency

    def latency(point):
        before = engine.trials
        c = original(point)
        if engine.trials != before:
            progress.update(task, advance=1, description=f"measured {c.label}")
        return c

    engine.latency = latency


def search(model, device, calib, eval_data, *, out_dir=None, algorithm="evolve", log_path=None,
           resume: bool = False, console: Console | None = None, **engine_options) -> SearchResult:
    """Run a search and write its outputs; see :class:`SearchEngine` for the options.

    With ``resume`` (``--resume LOG``) ``log_path`` must hold a search: a
    missing or empty log is a one-line error, not a new search. Without it
    (``--log LOG``) a missing log is started, and an existing one continued.
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
    from ..compile import compile as hago_compile

    out.mkdir(parents=True, exist_ok=True)
    built = hago_compile(engine.prepared, engine.spec, strategy=result.strategy, out_dir=out, measure=False)
    _scores_into_report(built.report, engine, result)
    pareto = front(result.candidates)
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
        "seconds": round(result.seconds, 1), "log": str(engine.log.path),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    rows = [{"strategy": c.label, "latency_ms": c.latency_ms, "score": c.accuracy, "error": c.error}
            for c in result.candidates]
    (out / "pareto.json").write_text(json.dumps({"front": [c.label for c in pareto], "candidates": rows}, indent=1))
    plot(result.candidates, pareto, result.best, result.threshold, out / "pareto.png", engine.metric_name,
         result.fp32)


def _scores_into_report(report: dict, engine: SearchEngine, result: SearchResult) -> None:
    """The engine already scored FP32 and the chosen build on the evaluation data: report those numbers."""
    report["eval_samples"] = len(engine.eval_samples)
    if engine.metric_name == "top-1":
        report["fp32"]["accuracy"], report["quantized"]["accuracy"] = engine.fp32_score, result.best.accuracy
    elif engine.metric_name == "top-1 agreement with FP32":
        report["agreement"] = result.best.accuracy


def print_search(result: SearchResult, console: Console | None = None) -> None:
    console = console or Console()
    engine = result.extras["engine"]
    console.print(table(front(result.candidates), result.best, result.threshold, engine.metric_name))
    style = "green" if result.met_target else "bold red"
    console.print(f"[{style}]{result.message}[/]")
    console.print(f"{result.trials} device measurements this run, {result.reused} reused from the log, "
                  f"{result.seconds:.0f}s; space of {engine.space.size_text()} strategies")
