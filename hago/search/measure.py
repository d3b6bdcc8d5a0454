"""Latency of a candidate build on its device, behind one small protocol.

The search sees only :class:`Measurer`: ``measure(lib_path, inputs)`` returns a
:class:`~hago.measure.Measurement` whose ``error`` is set when the build
crashed, hung past the time-out or the device was unreachable. Implementations:

* :class:`LocalMeasurer`: this machine, in a child process with a time-out;
* :class:`RPCMeasurer`: a board or GPU host through TVM's RPC tracker.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from ..measure import THREADS_ENV, Measurement
from .target import SearchError

InputSpec = list[tuple[list[int], str]]

MIN_TIMEOUT_S = 1.0  # below this not even a tiny model is loaded and timed once


def check_timeout(timeout_s) -> float:
    """``timeout_s`` as a float if it is a usable measurement time-out; a one-line SearchError otherwise."""
    try:
        t = float(timeout_s)
    except (TypeError, ValueError):
        t = math.nan
    if isinstance(timeout_s, bool) or not math.isfinite(t) or t < MIN_TIMEOUT_S:
        raise SearchError(f"measure timeout {timeout_s!r} is not usable: give a number of seconds, "
                          f"at least {MIN_TIMEOUT_S:g} (default 60)")
    return t


class Measurer(Protocol):
    name: str

    def measure(self, lib_path: Path, inputs: InputSpec) -> Measurement: ...


class LocalMeasurer:
    """Times builds in a long-lived ``python -m hago.search.worker`` child, each with a time-out.

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
        self.command = command or [sys.executable, "-m", "hago.search.worker"]
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


class RPCMeasurer:
    """Times builds on a remote device reached through an RPC tracker (``host:port`` and ``key``).

    With ``check`` (the default) the tracker is asked once, on construction,
    whether it answers and has a server under ``key``
    (:func:`hago.rpc.check_tracker`, a few seconds at most): an unreachable
    tracker or an absent board is a one-line :class:`~hago.errors.MeasureError`
    before any candidate is built, instead of a search whose every
    measurement fails.
    """

    name = "rpc"

    def __init__(self, tracker: str, key: str, timeout_s: float = 60.0, repeat: int = 5, min_repeat_ms: float = 100,
                 device: str = "cpu", check: bool = True):
        from ..rpc import check_tracker, parse_tracker

        timeout_s = check_timeout(timeout_s)
        parse_tracker(tracker)
        if check:
            check_tracker(tracker, key)
        self.tracker, self.key, self.timeout_s, self.device = tracker, key, timeout_s, device
        self.repeat, self.min_repeat_ms = repeat, min_repeat_ms

    def measure(self, lib_path: Path, inputs: InputSpec) -> Measurement:
        import numpy as np

        from ..rpc import measure_rpc

        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(shape).astype(dtype) for shape, dtype in inputs]
        return measure_rpc(lib_path, tracker=self.tracker, key=self.key, inputs=arrays, timeout=self.timeout_s,
                           repeat=self.repeat, min_repeat_ms=self.min_repeat_ms, device=self.device)
