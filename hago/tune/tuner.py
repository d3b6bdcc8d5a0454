"""Task extraction, tuning of the uncached tasks, and the build that applies the cache.

A module goes through the CPU pipeline in three steps, the same whether or
not anything is tuned, so a workload's key never depends on the budget:

1. ``prepare``: PrimFuncs holding one of the backend's kernels are marked
   opaque (as its default schedules mark them in an untuned build, x86's
   ``schedule_vnni``, so FuseOps keeps them standalone), then dispatch +
   LegalizeOps + FuseOps + FuseTIR
   (what ``relax.get_pipeline("zero")`` does). Every remaining PrimFunc is a
   task.
2. ``tune``: for each task below the budget, hago kernels first get their
   hand-written schedule measured and committed as a record, so a small
   budget can only improve on the untuned build; then MetaSchedule searches.
3. ``compile_cached``: ``MetaScheduleApplyDatabase`` with the cached records,
   the backend's default schedules for the kernels no record covers, lowering.

The backend (:mod:`hago.backends`) says which PrimFuncs are its kernels,
how they are scheduled by default and which tensor intrinsics they need;
nothing here knows a device.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import types
from dataclasses import dataclass

import tvm
from tvm import relax

from ..lower import apply_default_schedule, finish, fuse, is_scheduled, kernels_standalone, schedule_kernel
from ..errors import error_line
from ..tvm_consts import OPAQUE
from .cache import Entry, TuningCache

log = logging.getLogger(__name__)

MAX_TRIALS_PER_ITER = 32
MIN_POPULATION = 16
XGB_WARMUP = 100


@dataclass
class Task:
    name: str
    mod: tvm.IRModule  # the workload: one PrimFunc named "main"
    entry: Entry
    kernel: bool  # a hago kernel: it has a hand-written default schedule
    backend: object = None  # the hago.backends.Backend whose kernels and default schedules apply
    target: object = None  # the build target (the register tiles of some default schedules depend on it)


# ---- step 1 ------------------------------------------------------------------
def prepare(mod: tvm.IRModule, target: tvm.target.Target, backend) -> tvm.IRModule:
    """Legalize and fuse ``mod`` for ``target`` with ``backend``'s kernels kept standalone."""
    return fuse(kernels_standalone(mod, backend), target, backend)


def extract(prepared: tvm.IRModule, target: tvm.target.Target, cache: TuningCache, backend) -> list[Task]:
    """The tunable PrimFuncs of ``prepared`` (pre-scheduled ones, e.g. ARM kernels, are left out)."""
    from tvm.s_tir import meta_schedule as ms

    tasks = []
    for t in ms.relax_integration.extract_tasks(prepared, target):
        wl = t.dispatched[0]
        func = wl["main"]
        if is_scheduled(func):
            continue
        tasks.append(Task(str(t.task_name), wl, cache.entry(wl), backend.is_kernel(func), backend, target))
    return tasks


# ---- tensor intrinsics ---------------------------------------------------------
def import_cpu_intrinsics() -> None:
    """``import tvm.s_tir.tensor_intrin`` without parsing its CUDA and ROCm intrinsics.

    MetaSchedule's ``TuneContext`` imports the package, whose ``__init__``
    parses ~60 s of GPU TVMScript on this 2-core machine (7 s for the CPU
    ones). Placeholders stand in for the GPU submodules during the import and
    are removed afterwards, so a later ``import tvm.s_tir.tensor_intrin.cuda``
    still loads (and registers) the real ones.
    """
    package = "tvm.s_tir.tensor_intrin"
    if package in sys.modules:
        return
    stubs = [n for n in ("cuda", "rocm") if f"{package}.{n}" not in sys.modules]
    for name in stubs:
        sys.modules[f"{package}.{name}"] = types.ModuleType(f"{package}.{name}")
    try:
        importlib.import_module(package)
    finally:
        loaded = sys.modules.get(package)
        for name in stubs:
            del sys.modules[f"{package}.{name}"]
            if loaded is not None and hasattr(loaded, name):
                delattr(loaded, name)


def ensure_intrinsics(target: tvm.target.Target, backend, names: set[str] = frozenset(),
                      tuning: bool = False) -> None:
    """Register what tuning (``tuning``) or replaying records (``names``) needs."""
    from tvm.s_tir import TensorIntrin

    backend.register_intrinsics(target)  # hago's own: the default schedules (and their records) tensorize with them
    missing = {n for n in names if TensorIntrin.get(n, allow_missing=True) is None}
    if tuning or missing or names & backend.shipped_intrinsics:
        import_cpu_intrinsics()
        backend.fix_shipped_intrinsics(target)  # e.g. MetaSchedule's VNNI rule looks up the shipped name


# ---- step 2 ------------------------------------------------------------------
def default_schedule(mod: tvm.IRModule, backend=None, target=None):
    """The schedule an untuned build gives ``mod``, as a traced ``Schedule`` (None: none).

    ``backend``'s kernels get their hand-written schedule; any other workload the
    default of ``hago.lower`` (parallel, vectorized). Committed as the first
    record of every task, so a small budget can only improve on the untuned
    build: MetaSchedule's few random samples of a fused element-wise
    function are often slower than the default.
    """
    from tvm.s_tir import Schedule, ScheduleError

    sch = Schedule(mod)  # traced: the record replays the default schedule
    try:
        if backend is not None and backend.schedule_kernels(sch):
            return sch
    except (ScheduleError, tvm.error.InternalError) as e:
        log.warning("default schedule of a hago kernel failed: %s", error_line(e, limit=None))
        return None
    if backend is not None and target is not None:
        sch = Schedule(mod)
        if schedule_kernel(sch, lambda s: backend.schedule_fused(s, target)):
            return sch
    sch = Schedule(mod)
    return sch if apply_default_schedule(sch) else None


def default_fingerprint(task: Task) -> str | None:
    """A hash of the trace of ``task``'s default schedule (None: it has none).

    Stored with the records, so a cached workload whose default schedule
    has since changed (hago's defaults improved) gets the new one committed
    too: a tuned build is then never slower than an untuned one.
    """
    import hashlib
    import json

    sch = default_schedule(task.mod, task.backend, task.target)
    return None if sch is None else hashlib.sha256(json.dumps(sch.trace.as_json(), default=str).encode()).hexdigest()[:16]


def commit_default(task: Task, database, target, builder, runner) -> float | None:
    """Measure the default schedule of ``task`` and commit it; its latency in ms (None: failed)."""
    import shutil
    from pathlib import Path

    from tvm.s_tir import meta_schedule as ms

    sch = default_schedule(task.mod, task.backend, task.target)
    if sch is None:
        return None
    args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if built.error_msg:
        log.warning("%s: default schedule failed to build: %s", task.name, error_line(built.error_msg, limit=None))
        return None
    try:
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])
        result = future.result()
    finally:
        shutil.rmtree(Path(built.artifact_path).parent, ignore_errors=True)
    if result.error_msg or not result.run_secs:
        log.warning("%s: default schedule failed to run: %s", task.name, (result.error_msg or "").strip()[-200:])
        return None
    secs = [float(s) for s in result.run_secs]
    workload = database.commit_workload(task.mod)
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, secs, target, args))
    return min(secs) * 1e3


def population(trials: int) -> int:
    """Evolutionary population for a budget: MetaSchedule's 512 needs minutes per iteration on 2 cores.

    A small design space (an elementwise task has a handful of schedules) makes
    the search resample the whole population many times over; 1 trial of an
    elementwise task took 46 s at 512 and 12 s at 64.
    """
    return max(MIN_POPULATION, min(512, 8 * trials))


def cost_model(total_trials: int):
    """One cost model for all tasks of a tuning run, as MetaSchedule's multi-task tuning shares one.

    XGBoost predicts nothing before ``num_warmup_samples`` (100) measurements,
    it returns random scores, yet retrains after every batch (up to 17 s for
    one trial here): below that many trials the random model is the same
    search without the training.
    """
    from tvm.s_tir import meta_schedule as ms

    if total_trials < XGB_WARMUP:
        return ms.CostModel.create("random")
    return ms.CostModel.create("xgb", num_warmup_samples=XGB_WARMUP, num_tuning_cores=os.cpu_count() or 1)


def search(task: Task, database, target, trials: int, builder, runner, model, callbacks, seed: int = 0) -> None:
    """Run ``trials`` MetaSchedule trials on ``task`` into ``database``."""
    from tvm.s_tir import meta_schedule as ms

    pop = population(trials)
    strategy = ms.search_strategy.EvolutionarySearch(population_size=pop, init_min_unmeasured=min(50, pop // 4))
    ctx = ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply",
                         search_strategy=strategy, task_name=task.name,
                         logger=logging.getLogger("tvm.s_tir.meta_schedule.hago"), rand_state=seed,
                         num_threads="physical").clone()
    with tempfile.TemporaryDirectory(prefix="hago_tune_") as work_dir:
        ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=work_dir, max_trials_global=trials,
                      max_trials_per_task=trials, num_trials_per_iter=min(trials, MAX_TRIALS_PER_ITER),
                      builder=builder, runner=runner, database=database, cost_model=model,
                      measure_callbacks=[*ms.MeasureCallback.create("default"), *callbacks],
                      task_scheduler="round-robin")


# ---- step 3 ------------------------------------------------------------------
def compile_cached(prepared: tvm.IRModule, target: tvm.target.Target, tasks: list[Task], backend):
    """Build ``prepared`` with the cached records of ``tasks``, ``backend``'s default schedules elsewhere."""
    from tvm.s_tir import meta_schedule as ms

    cached = [t for t in tasks if t.entry.has_records]
    ensure_intrinsics(target, backend, set().union(*(t.entry.intrinsics() for t in cached)))
    dbs = []
    for t in cached:
        db = t.entry.database()
        if db.query_tuning_record(t.mod, target, t.name) is not None:
            dbs.append(db)
    mod = prepared
    if dbs:
        database = dbs[0] if len(dbs) == 1 else ms.database.UnionDatabase(*dbs)
        with target, database:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    return finish(backend.schedule(mod, target), target, backend=backend)
