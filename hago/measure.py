"""measure: latency of a build on its device.

Local builds are timed with the VM's ``time_evaluator`` (median of several
repeats, each long enough to swamp timer noise). The result is a frozen
:class:`Measurement` whose ``error`` is set instead of raising, so a failed
or crashed candidate is data for the search, not the end of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax


@dataclass(frozen=True)
class Measurement:
    latency_ms: float | None
    std_ms: float | None = None
    repeats: int = 0
    error: str | None = None
    kernels: tuple = ()  # (signature, ms) per kernel call, when the measurer profiles

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency_ms is not None


THREADS_ENV = "TVM_NUM_THREADS"


def device_threads(cores: int | None) -> None:
    """Make this process's TVM thread pool use ``cores`` threads (the spec's ``num-cores``).

    Without it TVM sizes its pool to half the logical CPUs on x86 (it assumes
    hyper-threading), so a 2-core machine without SMT runs every kernel on one
    thread. The pool reads the variable once, when it starts, so this must run
    before the first parallel kernel; a value the user set wins.
    """
    if cores:
        os.environ.setdefault(THREADS_ENV, str(int(cores)))


def pool_threads() -> int:
    """Threads in this process's TVM thread pool (starts the pool if it has not started)."""
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def example_args(params, batch: int = 1, seed: int = 0) -> list:
    """Random inputs matching ``main``'s parameters, symbolic dims set to ``batch``."""
    rng = np.random.default_rng(seed)
    args = []
    for p in params:
        shape = [int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else batch for d in p.ty.shape]
        args.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(str(p.ty.dtype))))
    return args


def measure_local(executable, params, batch: int = 1, min_repeat_ms: float = 200, repeat: int = 5) -> Measurement:
    """Median latency in ms of ``main`` at ``batch`` on this CPU."""
    try:
        dev = tvm.cpu()
        vm = relax.VirtualMachine(executable, dev)
        args = example_args(params, batch)
        vm["main"](*args)  # warm up: first call pays for lazy initialisation
        timer = vm.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
        res = timer(*args)
        return Measurement(res.median * 1e3, float(np.std(res.results) * 1e3), repeat)
    except Exception as e:  # a crashed measurement is a result, not a crash of hago
        return Measurement(None, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
