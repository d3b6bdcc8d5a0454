"""Timing on this machine: in this process, or in a worker child with a time-out.

Local builds are timed with the VM's ``time_evaluator`` (median of several
repeats, each long enough to swamp timer noise). :func:`measure_local` times an
executable in this process (``hago compile``); :class:`LocalMeasurer` times an
exported library in a long-lived child (:mod:`hago.measure.worker`), so a
kernel that crashes or hangs costs a measurement, not the search. TVM's thread
pool gets the device's cores (:func:`device_threads`) in both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import error_line
from .base import InputSpec, Measurement, check_timeout

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
    import tvm  # noqa: F401  (loads the runtime, which registers runtime.NumThreads)
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def example_args(params, batch: int = 1, seed: int = 0) -> list:
    """Random inputs matching ``main``'s parameters, symbolic dims set to ``batch``."""
    import tvm

    rng = np.random.default_rng(seed)
    args = []
    for p in params:
        shape = [int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else batch for d in p.ty.shape]
        args.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(str(p.ty.dtype))))
    return args


def measure_local(executable, params, batch: int = 1, min_repeat_ms: float = 200, repeat: int = 5) -> Measurement:
    """Median latency in ms of ``main`` at ``batch`` on this CPU."""
    try:
        import tvm
        from tvm import relax

        dev = tvm.cpu()
        vm = relax.VirtualMachine(executable, dev)
        args = example_args(params, batch)
        vm["main"](*args)  # warm up: first call pays for lazy initialisation
        timer = vm.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
        res = timer(*args)
        return Measurement(res.median * 1e3, float(np.std(res.results) * 1e3), repeat)
    except Exception as e:  # a crashed measurement is a result, not a crash of hago
        return Measurement(None, error=error_line(e, with_type=True))


class LocalMeasurer:
    """Times builds in a long-lived ``python -m hago.measure.worker`` child, each with a time-out.

    A measurement that overruns ``timeout_s`` kills the child (a hung kernel
    cannot be interrupted otherwise); one that crashes it ends the same way.
    Either becomes a failed :class:`Measurement` and the next request starts a
    fresh child.
    """

    name = "local"

    def __init__(self, timeout_s: float = 60.0, repeat: int = 5, min_repeat_ms: float = 100,
                 command: list[str] | None = None, start_timeout_s: float = 120.0, threads: int | None = None):
        timeout_s = check_timeout(timeout_s)
        self.timeout_s, self.repeat, self.min_repeat_ms = timeout_s, repeat, min_repeat_ms
        self.threads = threads  # the device's cores (TVM's own default is half the logical CPUs on x86)
        self.command = command or [sys.executable, "-m", "hago.measure.worker"]
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._eof = False  # the last _readline hit end-of-file (the child closed stdout)

    def _start(self) -> str | None:
        env = dict(os.environ)
        if self.threads:
            env.setdefault(THREADS_ENV, str(int(self.threads)))
        self._proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env)
        reply = self._readline(self.start_timeout_s)
        return None if reply and reply.get("ready") else "measurement worker failed to start"

    def _readline(self, timeout: float) -> dict | None:
        """One JSON line from the child, or None on time-out or EOF."""
        import select

        self._eof = False
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        self._eof = line == ""
        return json.loads(line) if line.startswith("{") else None

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def measure(self, lib_path: Path, inputs: InputSpec) -> Measurement:
        if self._proc is None or self._proc.poll() is not None:
            if (err := self._start()) is not None:
                self.close()
                return Measurement(None, error=err)
        request = {"lib": str(lib_path), "inputs": inputs, "repeat": self.repeat, "min_repeat_ms": self.min_repeat_ms,
                   "profile": True}
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            return Measurement(None, error="measurement process died before the request")
        reply = self._readline(self.timeout_s)
        if reply is None:
            if self._eof:  # EOF can arrive before the exit status: give the dying child a moment
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            died = self._proc.poll() is not None
            code = self._proc.returncode
            self.close()
            if died:
                return Measurement(None, error=f"measurement process died (exit {code})")
            return Measurement(None, error=f"timed out after {self.timeout_s:g}s")
        if "error" in reply:
            return Measurement(None, error=reply["error"])
        return Measurement(reply["latency_ms"], reply.get("std_ms"), self.repeat,
                           kernels=tuple(tuple(k) for k in reply.get("kernels", ())))

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
