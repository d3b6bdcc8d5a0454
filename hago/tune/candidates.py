"""Builders, runners and the progress callback MetaSchedule tunes with.

``fast_build`` and ``cross_export`` run in MetaSchedule's builder worker
processes, which unpickle them by reference: this module therefore imports
nothing heavier than TVM at the top.

* **Builder.** MetaSchedule's ``default_build`` imports
  ``tvm.s_tir.tensor_intrin`` in every fresh worker (20-60 s here), so builds
  time out; ``fast_build`` is the same build without that import (the
  candidates arrive tensorized). ``PoolBuilder`` also keeps its workers
  between batches.
* **Cross targets** (a Raspberry Pi from x86): ``cross_export`` links each
  candidate into a ``.so`` with the spec's cross compiler, so the board needs
  no compiler of its own; the default export ships a ``.tar`` of objects that
  the board's RPC server would have to link itself.
* **Runner.** ``local_runner`` times on this machine; ``rpc_runner`` on a board
  or host behind an RPC tracker (``python -m tvm.exec.rpc_tracker``).
"""

from __future__ import annotations

import logging
import os
import tempfile

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

log = logging.getLogger(__name__)

#: how each candidate is timed: 3 runs of at least 50 ms, cache left warm (the notes' lab settings)
EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 50, "enable_cpu_cache_flush": False}


def fast_build(mod, target, _params):
    """MetaSchedule's ``default_build`` minus its ``import tvm.s_tir.tensor_intrin``, with hago's TIR pipeline.

    The pipeline (``stack_alloc``) is the one the final build uses, so a
    candidate is timed with the same scratch buffers on the stack.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .. import stack_alloc

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target, pipeline=stack_alloc.PIPELINE)


def cross_export(compiler: str, rt_mod) -> str:
    """Link a candidate into a shared library with ``compiler`` (e.g. ``aarch64-linux-gnu-g++``)."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="hago_ms_"), "candidate.so")
    rt_mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    return path


def build_candidate(cross_compiler: str | None, mod, target) -> str:
    """Build one candidate and export it: the artifact path (runs in a builder worker)."""
    rt_mod = fast_build(mod, target, None)
    if cross_compiler:
        return cross_export(cross_compiler, rt_mod)
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    return default_export(rt_mod)


def _build_packed(args: tuple) -> str:
    return build_candidate(*args)


@derived_object
class PoolBuilder(PyBuilder):
    """MetaSchedule's ``LocalBuilder`` with ``fast_build`` and a pool that outlives a batch.

    ``LocalBuilder`` starts a fresh process pool for every batch (against a
    memory leak in long-lived workers); each worker then imports TVM, 5-10 s
    on this machine against 0.03 s for building a small candidate. Here the
    pool is kept and each worker is replaced after ``max_uses`` builds instead.
    """

    def __init__(self, cross_compiler: str | None = None, timeout_sec: float = 60.0,
                 max_workers: int | None = None, max_uses: int = 64):
        super().__init__()
        self.cross_compiler, self.timeout_sec = cross_compiler, timeout_sec
        self.pool = PopenPoolExecutor(max_workers=max_workers or os.cpu_count() or 1, timeout=timeout_sec,
                                      maximum_process_uses=max_uses)

    def build(self, build_inputs):
        results = []
        args = [(self.cross_compiler, b.mod, b.target) for b in build_inputs]
        for res in self.pool.map_with_error_catching(_build_packed, args):
            if res.status == StatusKind.COMPLETE:
                results.append(BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(None, f"build failed: {res.value}"))
        return results

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def local_builder(cross_compiler: str | None = None, timeout_sec: float = 60.0) -> PoolBuilder:
    """A builder with ``fast_build`` (and ``cross_export`` for a cross compiler) and a lasting pool."""
    return PoolBuilder(cross_compiler, timeout_sec)


def local_runner(timeout_sec: float = 30.0):
    """Time candidates on this CPU, one at a time."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=ms.runner.EvaluatorConfig(**EVALUATOR))


def rpc_runner(tracker: str, key: str, *, session_timeout_sec: int = 60, check: bool = True,
               max_workers: int | None = None):
    """Time candidates on the boards registered as ``key`` with the tracker at ``"host:port"``.

    One worker per free board (``max_workers`` caps it): MetaSchedule's
    runner then keeps that many sessions busy, each board timing one
    candidate at a time (the tracker hands a board to one session), so a farm
    tunes in parallel; the tuning database stays the one per device. Each
    candidate gets a fresh session of at most ``session_timeout_sec``. With
    ``check`` the tracker and key are probed first, so a dead tracker or an
    absent board is one :class:`~hago.errors.MeasureError` instead of a failed
    session per trial.
    """
    from tvm.s_tir import meta_schedule as ms

    from ..measure.rpc import check_tracker, parse_tracker, session

    host, port = parse_tracker(tracker)
    workers = 1
    if check:  # count the free boards before the probe session takes one
        workers = max(1, int(check_tracker(tracker, key)[key].get("free", 1)))
        with session(tracker, key, timeout=min(session_timeout_sec, 30)):
            pass
    if max_workers is not None:
        workers = min(workers, max_workers) if check else max_workers
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_timeout_sec=session_timeout_sec)
    return ms.runner.RPCRunner(config, evaluator_config=ms.runner.EvaluatorConfig(**EVALUATOR),
                               max_workers=workers)


def progress_callback(on_batch):
    """A MetaSchedule measure callback calling ``on_batch(trials, failed)`` after each batch."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            failed = sum(1 for b, r in zip(builder_results, runner_results) if b.error_msg or r.error_msg)
            on_batch(len(runner_results), failed)

    return _Progress()
