"""What every way of timing a build shares: the result record and the protocol.

The search (and ``compile`` for a remote device) sees only :class:`Measurer`:
``measure(lib_path, inputs)`` returns a frozen :class:`Measurement` whose
``error`` is set when the build crashed, hung past the time-out or the device
was unreachable, so a failed or crashed candidate is data for the search, not
the end of it (MetaSchedule's ``RunnerResult.error_msg`` does the same).
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

#: ``main``'s parameters as ``[(shape, dtype), ...]``: what a measurer feeds random inputs of
InputSpec = list[tuple[list[int], str]]

MIN_TIMEOUT_S = 1.0  # below this not even a tiny model is loaded and timed once


@dataclass(frozen=True)
class Measurement:
    latency_ms: float | None
    std_ms: float | None = None
    repeats: int = 0
    error: str | None = None
    kernels: tuple = ()  # (signature, ms) per kernel call, when the measurer profiles
    board: str | None = None  # which board measured it (a farm board's address), when the measurer knows
    attempts: tuple = ()  # (board, error) of failed attempts before this result (a farm retries once elsewhere)

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency_ms is not None


class Measurer(Protocol):
    """Times an exported build on its device: :class:`~hago.measure.local.LocalMeasurer` (this machine, in a
    child process with a time-out) or :class:`~hago.measure.rpc.RPCMeasurer` (a board or GPU host through
    TVM's RPC tracker)."""

    name: str

    def measure(self, lib_path: Path, inputs: InputSpec) -> Measurement: ...


class ParallelMeasurer(Measurer, Protocol):
    """A measurer with several boards (:class:`~hago.measure.farm.FarmMeasurer`): ``submit`` returns at once
    with a future, so the search builds and scores the next candidates while the boards measure."""

    def submit(self, lib_path: Path, inputs: InputSpec) -> Future: ...

    def status(self) -> dict: ...

    def close(self) -> None: ...


def check_timeout(timeout_s) -> float:
    """``timeout_s`` as a float if it is a usable measurement time-out; a one-line SearchError otherwise."""
    try:
        t = float(timeout_s)
    except (TypeError, ValueError):
        t = math.nan
    if isinstance(timeout_s, bool) or not math.isfinite(t) or t < MIN_TIMEOUT_S:
        from ..search.target import SearchError  # a search option; imported late: the target module loads TVM

        raise SearchError(f"measure timeout {timeout_s!r} is not usable: give a number of seconds, "
                          f"at least {MIN_TIMEOUT_S:g} (default 60)")
    return t
