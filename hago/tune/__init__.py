"""tune: MetaSchedule tuning for CPU builds, with a persistent per-device cache.

Pipeline position: the build stage of a CPU backend (``Backend.tunable``), in
place of its untuned build. ``tune_and_build(mod, target, trials=0, ...)`` tunes nothing but
still applies every schedule the cache holds for ``mod``'s workloads, then
hago's hand-written VNNI schedules, so a cache filled once (by ``hago compile
--tune-trials N``, a search or another model sharing layers) speeds up every
later build of the same shapes on the same device.

``trials`` is a budget **per task** (the AutoTVM convention, not
MetaSchedule's global one): a workload is tuned only while the budget it was
tuned to is below ``trials``, and then only by the difference, so a second
build makes no trial at all and raising the budget tops tasks up. FP32 and
integer modules go through the same function with the same budget, so their
latency ratio stays fair.

A backend's kernels are tuned too (it says which PrimFuncs they are and how they
are scheduled by default). x86's VNNI kernels: MetaSchedule's VNNI rule tensorizes them
with ``dot_16x4_vnni`` (re-registered LLVM-22 clean by
``fix_shipped_vnni_intrin``), and their hand-written schedule is measured and
committed as the first record, so the database always holds a ``vpdpbusd``
schedule and a small budget cannot make a kernel slower than untuned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import tvm

from .. import backends
from ..errors import BuildError, error_line
from .cache import CACHE_ENV, DEFAULT_CACHE_DIR, SCHEMA, TuningCache, default_cache_dir
from .candidates import PoolBuilder, fast_build, local_builder, local_runner, progress_callback, rpc_runner
from .options import TuneOptions
from .progress import bar
from .tuner import (Task, commit_default, compile_cached, cost_model, default_fingerprint, ensure_intrinsics, extract,
                    prepare, search)

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV", "DEFAULT_CACHE_DIR", "SCHEMA", "PoolBuilder", "TuneOptions", "TuneStats", "Tuned", "build_tuned",
    "default_cache_dir", "fast_build", "local_builder", "local_runner", "rpc_runner", "tune", "tune_and_build",
]

MS_LOGGER = "tvm.s_tir.meta_schedule"


@dataclass(frozen=True)
class TuneStats:
    """What one ``tune_and_build`` did: ``new_trials == 0`` means everything came from the cache."""

    tasks: int = 0  # tunable workloads in the module
    reused_tasks: int = 0  # already tuned to the budget (or, with trials=0, with cached records)
    tuned_tasks: int = 0  # tuned in this call
    new_trials: int = 0  # MetaSchedule trials measured in this call
    failed_trials: int = 0  # of which failed to build or run (normal for VNNI: lane mismatches)
    seconds: float = 0.0  # tuning time (not the final build)


class Tuned(NamedTuple):
    executable: object  # tvm.relax.VMExecutable
    stats: TuneStats


def tune(tasks: list[Task], target: tvm.target.Target, *, trials: int, runner=None, builder=None,
         cross_compiler: str | None = None, progress: bool = True) -> TuneStats:
    """Tune every task of ``tasks`` whose cached budget is below ``trials``, by the difference.

    The tasks' backend (``Task.backend``, one for all) gives the kernels' default schedules and intrinsics.
    """
    fingerprints = {t.name: default_fingerprint(t) for t in tasks}  # one default schedule per task, not three
    todo = [t for t in tasks if t.entry.budget < trials or _stale_default(t, fingerprints[t.name])]
    if not todo:
        return TuneStats(len(tasks), len(tasks), 0)
    if runner is None and cross_compiler:
        raise BuildError("tuning a cross-compiled target needs a runner on the device: pass an RPC tracker")
    t0 = time.perf_counter()
    logging.getLogger(MS_LOGGER).setLevel(logging.WARNING)
    ensure_intrinsics(target, todo[0].backend, tuning=True)
    own_builder = builder is None
    builder = builder or local_builder(cross_compiler)
    runner = runner or local_runner()
    total = sum(max(0, trials - t.entry.budget) for t in todo)
    model = cost_model(total)
    counts = {"trials": 0, "failed": 0}
    try:
        with bar(total, enabled=progress) as advance:
            def on_batch(n: int, failed: int) -> None:
                counts["trials"] += n
                counts["failed"] += failed
                advance(n)

            callback = progress_callback(on_batch)
            for task in todo:
                advance(0, description=task.name)
                budget, before = max(0, trials - task.entry.budget), counts["trials"]
                _tune_task(task, fingerprints[task.name], target, trials, builder, runner, model, callback, counts)
                advance(max(0, budget - (counts["trials"] - before)))  # a small search space ends early
    finally:
        if own_builder:
            builder.close()
    secs = time.perf_counter() - t0
    log.info("tuned %d of %d tasks: %d trials (%d failed) in %.1fs", len(todo), len(tasks), counts["trials"],
             counts["failed"], secs)
    return TuneStats(len(tasks), len(tasks) - len(todo), len(todo), counts["trials"], counts["failed"], secs)


def _stale_default(task: Task, fp: str | None) -> bool:
    """Whether ``task``'s cached records lack its current default schedule ``fp`` (``default_fingerprint``)."""
    return fp is not None and task.entry.default_schedule != fp


def _tune_task(task: Task, fp: str | None, target, trials: int, builder, runner, model, callback,
               counts: dict) -> None:
    """Default record (hago's untuned schedule, fingerprint ``fp``), then the search; ``meta.json`` gets the result."""
    before = dict(counts)
    db = task.entry.database()
    default_ms = None
    if _stale_default(task, fp):
        default_ms = commit_default(task, db, target, builder, runner)
    if trials > task.entry.budget:
        try:
            search(task, db, target, trials - task.entry.budget, builder, runner, model, [callback])
        except Exception as e:  # a task MetaSchedule cannot tune keeps its default schedule
            log.warning("tuning %s failed, it keeps its default schedule: %s", task.name, error_line(e, limit=300))
    task.entry.record(task=task.name, budget=trials, trials=counts["trials"] - before["trials"],
                      failed=counts["failed"] - before["failed"], default_ms=default_ms,
                      default_schedule=fp)  # also when it failed to build or run: not retried every build


def tune_and_build(mod: tvm.IRModule, target: tvm.target.Target, *, trials: int, cache_dir: str | Path | None = None,
                   device_key: str, runner=None, progress: bool = True, cross_compiler: str | None = None,
                   builder=None, backend: backends.Backend | None = None) -> Tuned:
    """Tune ``mod``'s uncached workloads for ``target``, then build it with every cached schedule.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module with static shapes (``build.static_batch``), after
        ``realize`` (and the backend's kernel swap: ARM's pre-scheduled
        kernels are left alone).
    target : tvm.target.Target
        A target of a tunable (CPU) backend; CUDA builds go through ``build.build``.
    trials : int
        MetaSchedule trials per task; 0 tunes nothing but still applies the cache.
    cache_dir : path, optional
        The cache root (default ``$HAGO_CACHE_DIR`` or ``~/.cache/hago/tuning``).
    device_key : str
        Names the device's cache folder, e.g. the spec name.
    runner : MetaSchedule runner, optional
        Where candidates are timed: this CPU by default, or ``rpc_runner(tracker, key)``.
    progress : bool
        A progress bar on stderr while tuning.
    cross_compiler : str, optional
        The spec's cross compiler: candidates are linked with it (needs an RPC runner).
    backend : hago.backends.Backend, optional
        Whose kernels are tasks of their own with a default schedule; default:
        the one that claims ``target`` (:func:`hago.backends.for_target`).

    Returns
    -------
    Tuned
        ``(executable, stats)``; ``stats.new_trials`` counts this call's trials.
    """
    if backend is None or backend.target_kind != target.kind.name:
        backend = backends.for_target(target)
    if not backend.tunable:
        raise BuildError(f"tuning supports LLVM (CPU) targets, not {target.kind.name} (backend {backend.name}); "
                         f"use --tune-trials 0")
    if trials < 0:
        raise BuildError(f"--tune-trials must be >= 0, got {trials}")
    cache = TuningCache(cache_dir if cache_dir is not None else default_cache_dir(), device_key, target)
    try:
        prepared = prepare(mod, target, backend)
        tasks = extract(prepared, target, cache, backend)
    except Exception as e:
        raise BuildError(f"preparing {device_key} for tuning failed: {error_line(e, limit=300)}") from None
    if trials > 0:
        stats = tune(tasks, target, trials=trials, runner=runner, builder=builder, cross_compiler=cross_compiler,
                     progress=progress)
    else:
        cached = sum(t.entry.has_records for t in tasks)
        stats = TuneStats(len(tasks), cached, 0)
    try:
        return Tuned(compile_cached(prepared, target, tasks, backend), stats)
    except Exception as e:
        raise BuildError(f"TVM failed to build the tuned module for {device_key}: {error_line(e, limit=300)}") from None


def build_tuned(mod: tvm.IRModule, target: tvm.target.Target, options: TuneOptions,
                backend: backends.Backend | None = None) -> Tuned:
    """``tune_and_build`` with ``options``; the RPC runner is made (and probed) only when tuning."""
    runner = rpc_runner(*options.rpc) if options.rpc and options.trials > 0 else None
    return tune_and_build(mod, target, trials=options.trials, cache_dir=options.cache_dir,
                          device_key=options.device_key, runner=runner, progress=options.progress,
                          cross_compiler=options.cross_compiler, backend=backend)
