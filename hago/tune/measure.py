"""Builders, runners and the progress callback MetaSchedule tunes with.

``fast_build`` and ``cross_export`` run in MetaSchedule's builder worker
processes, which unpickle them by reference: this module therefore imports
nothing heavier than TVM at the top.

* **Builder.** MetaSchedule's ``default_build`` imports
  ``tvm.s_tir.tensor_intrin`` in every fresh worker (20-60 s here, and the
  builder pool is recreated per batch), so builds time out; ``fast_build`` is
  the same build without that import (the candidates arrive tensorized).
* **Cross targets** (a Raspberry Pi from x86): ``cross_export`` links each
  candidate into a ``.so`` with the spec's cross compiler, so the board needs
  no compiler of its own; the default export ships a ``.tar`` of objects that
  the board's RPC server would have to link itself.
* **Runner.** ``local_runner`` times on this machine; ``rpc_runner`` on a board
  or host behind an RPC tracker (``python -m tvm.exec.rpc_tracker``).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile

log = logging.getLogger(__name__)

#: how each candidate is timed: 3 runs of at least 50 ms, cache left warm (the notes' lab settings)
EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 50, "enable_cpu_cache_flush": False}


def fast_build(mod, target, _params):
    """MetaSchedule's ``default_build`` minus its ``import tvm.s_tir.tensor_intrin``."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def cross_export(compiler: str, rt_mod) -> str:
    """Link a candidate into a shared library with ``compiler`` (e.g. ``aarch64-linux-gnu-g++``)."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="hago_ms_"), "candidate.so")
    rt_mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    return path


def local_builder(cross_compiler: str | None = None, timeout_sec: float = 60.0):
    """A ``LocalBuilder`` with ``fast_build`` (and ``cross_export`` for a cross compiler)."""
    from tvm.s_tir import meta_schedule as ms

    f_export = functools.partial(cross_export, cross_compiler) if cross_compiler else None
    return ms.builder.LocalBuilder(f_build=fast_build, f_export=f_export, timeout_sec=timeout_sec)


def local_runner(timeout_sec: float = 30.0):
    """Time candidates on this CPU, one at a time."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=ms.runner.EvaluatorConfig(**EVALUATOR))


def rpc_runner(tracker: str, key: str, *, session_timeout_sec: int = 60, check: bool = True):
    """Time candidates on the device registered as ``key`` with the tracker at ``"host:port"``.

    One worker: a board runs one candidate at a time, and each gets a fresh
    session of at most ``session_timeout_sec``. With ``check`` the tracker and
    key are probed first, so a dead tracker or an absent board is one
    :class:`~hago.errors.MeasureError` instead of a failed session per trial.
    """
    from tvm.s_tir import meta_schedule as ms

    from ..rpc import parse_tracker, session

    host, port = parse_tracker(tracker)
    if check:
        with session(tracker, key, timeout=min(session_timeout_sec, 30)):
            pass
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_timeout_sec=session_timeout_sec)
    return ms.runner.RPCRunner(config, evaluator_config=ms.runner.EvaluatorConfig(**EVALUATOR), max_workers=1)


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
