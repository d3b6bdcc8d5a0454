"""farm: measure on every board a TVM RPC tracker holds under one key, in parallel.

TVM's tracker already is the distributed engine: boards register under a key,
and it hands each free board to one client at a time. :class:`FarmMeasurer`
runs one worker thread per board it may use (the tracker's free servers for
the key, capped by ``max_devices``); each worker asks the tracker for a board,
opens a session, uploads and times one candidate, and closes it. So a board
never times two candidates at once (the tracker gives it to one session at a
time), and no queue of hago's own sits between the search and the boards.

* **Which board.** The tracker's answer names the server (``address:port``);
  every :class:`~hago.measure.base.Measurement` carries it (``board``), and the
  search writes it on each log line.
* **Faults are data.** A board that drops the connection, hangs past the
  time-out (the server kills the session: ``session_timeout``) or crashes is a
  failed *attempt*, recorded with its board; the candidate is tried once more
  on another board where one is alive, then it is a failed measurement and the
  search goes on. The board is counted lost until it serves again.
* **Heterogeneous farms are refused.** Each board is probed when it first hands
  out a session (``hago.board_facts``, registered by :mod:`hago.measure.board`):
  a board whose architecture, CPU flags or GPU does not fit the spec
  (``Backend.board_problem``) is refused with a one-line warning and never gets
  a candidate, so timings from different hardware never mix. A board started
  with TVM's plain server cannot be probed: one warning says its CPU is
  unchecked.
* **Up front.** An unreachable tracker, no server under the key, or every
  board refused is one :class:`~hago.errors.MeasureError` line before any
  candidate is built (within seconds).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import MeasureError, error_line
from .base import InputSpec, Measurement, check_timeout
from .board import FACTS_FUNCTION
from .rpc import check_tracker, parse_tracker, request_server, time_remote

log = logging.getLogger(__name__)

DISCOVER_WAIT_S = 5.0  # a board that just ended a session registers again in well under this
HOLD_TRIES = 3  # boards skipped while asking the tracker for another one than a retry must avoid


class FarmMeasurer:
    """Times builds on the boards a tracker holds under ``key``, up to ``max_devices`` at once.

    Parameters
    ----------
    tracker, key : str
        ``"host:port"`` of the tracker and the device key the boards registered.
    spec : HardwareSpec, optional
        The boards must fit it (:meth:`~hago.backends.base.Backend.board_problem`); None checks nothing.
    timeout_s : float
        Seconds a measurement may take (the session's lifetime on the board), and the longest wait for a
        free board.
    max_devices : int, optional
        Boards used at once at most; default all the tracker has free for the key at start.
    timer : str, optional
        A function registered on the boards that times an uploaded library (see
        :func:`~hago.measure.rpc.time_remote`); default the remote ``time_evaluator``.
    """

    name = "farm"

    def __init__(self, tracker: str, key: str, spec=None, *, timeout_s: float = 60.0, max_devices: int | None = None,
                 repeat: int = 5, min_repeat_ms: float = 100, device: str | None = None, timer: str | None = None):
        self.timeout_s = check_timeout(timeout_s)
        parse_tracker(tracker)
        if max_devices is not None and (isinstance(max_devices, bool) or not isinstance(max_devices, int)
                                        or max_devices < 1):
            raise MeasureError(f"max devices {max_devices!r} is not usable: give a whole number, at least 1")
        self.tracker, self.key, self.spec, self.timer = tracker, key, spec, timer
        self.repeat, self.min_repeat_ms = repeat, min_repeat_ms
        if device is None and spec is not None:
            from ..backends import backend_of

            device = backend_of(spec).device
        self.device = device or "cpu"
        self._lock = threading.Lock()
        self.accepted: set[str] = set()  # probed and fitting (or unprobeable, with a warning)
        self.refused: dict[str, str] = {}  # board -> why
        self.busy: set[str] = set()
        self.peak_busy = 0  # the most boards measuring at once so far
        self.board_seconds = 0.0  # time boards spent in hago's sessions (upload, load, timing), all boards
        self.lost: dict[str, str] = {}  # board -> the error that lost it, until it serves again
        check_tracker(tracker, key)
        self._discover(self._registered())
        self.workers = min(len(self.accepted), max_devices or len(self.accepted))
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hago-board")
        log.info("farm %s key %r: %d board(s), measuring on %d at once", tracker, key, len(self.accepted),
                 self.workers)

    # -- boards --------------------------------------------------------------------------
    def _registered(self) -> int:
        """How many servers are registered under the key (free, or in a session of someone's)."""
        from .rpc import tracker_summary

        summary = tracker_summary(self.tracker)
        listed = sum(1 for s in summary.get("server_info") or [] if s.get("key") == f"server:{self.key}")
        return max(1, listed, int(summary["queue_info"].get(self.key, {}).get("free", 0)))

    def _discover(self, boards: int) -> None:
        """Take every registered board once (held together, so the tracker hands out distinct ones) and probe
        it. A board busy elsewhere is waited for briefly; it is probed later, when it first serves."""
        held = []
        try:
            for i in range(boards):
                try:
                    held.append(self._take(self.timeout_s if i == 0 else DISCOVER_WAIT_S))
                except MeasureError:
                    break
        finally:
            del held  # closing the sessions gives the boards back to the tracker
        if not self.accepted:
            host, port = parse_tracker(self.tracker)
            why = "; ".join(f"{b} {r}" for b, r in self.refused.items()) or "none answered"
            raise MeasureError(f"no usable board under {self.key!r} on tracker {host}:{port}: {why}")

    def _take(self, wait_s: float):
        """``(board, session)`` of the next free board, probed the first time; None for a refused board
        (never connected to again: it puts itself back with the tracker in seconds)."""
        from tvm import rpc

        url, port, matchkey = request_server(self.tracker, self.key, wait_s)
        board = f"{url}:{port}"
        if board in self.refused:
            return board, None
        remote = rpc.connect(url, port, matchkey, session_timeout=max(1, int(self.timeout_s)))
        if board not in self.accepted:
            self._probe(board, remote)  # a refused board's session is still returned: discovery holds it till the end
        return board, remote

    def _connect(self, wait_s: float):
        """``(board, session)`` on a free board the spec accepts; MeasureError if none comes in ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MeasureError(f"no free board under {self.key!r} on tracker {self.tracker} in {wait_s:g}s")
            board, remote = self._take(left)
            if board not in self.refused:
                return board, remote

    def _probe(self, board: str, remote) -> str | None:
        """Accept or refuse a board the first time it hands out a session; the refusal, or None."""
        try:
            facts = json.loads(remote.get_function(FACTS_FUNCTION)())
        except Exception:
            facts = None
        problem = None
        if self.spec is not None:
            from ..backends import backend_of

            if facts is None:
                log.warning("board %s under %r cannot say what it is (a plain tvm.exec.rpc_server): its hardware is "
                            "not checked against %s; start it with `python -m hago.measure.board`", board,
                            self.key, self.spec.name)
            else:
                problem = backend_of(self.spec).board_problem(self.spec, facts)
        with self._lock:
            if problem is None:
                self.accepted.add(board)
            else:
                self.refused[board] = problem
                log.warning("board %s under %r refused: it %s (spec %s)", board, self.key, problem,
                            getattr(self.spec, "name", "?"))
        return problem

    def _acquire(self, avoid: set[str]):
        """A session on a board, another than those in ``avoid`` while another one is alive."""
        skipped = 0
        while True:
            board, remote = self._connect(self.timeout_s)
            with self._lock:
                others = self.accepted - avoid - set(self.lost)
            if board in avoid and others and skipped < HOLD_TRIES:
                skipped += 1
                del remote  # closed at once: the tracker gets this board back for someone else
                continue
            return board, remote

    # -- measuring -----------------------------------------------------------------------
    def submit(self, lib_path: Path, inputs: InputSpec) -> Future:
        """Measure on the next free board; the future's :class:`Measurement` names the board."""
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(shape).astype(dtype) for shape, dtype in inputs]
        return self._pool.submit(self._job, Path(lib_path), arrays)

    def measure(self, lib_path: Path, inputs: InputSpec) -> Measurement:
        return self.submit(lib_path, inputs).result()

    def _job(self, lib_path: Path, arrays: list[np.ndarray]) -> Measurement:
        attempts: list[tuple[str | None, str]] = []
        for _ in range(2):  # a failed attempt is retried once, on another board where one is alive
            try:
                board, remote = self._acquire({b for b, _ in attempts if b})
            except MeasureError as e:
                attempts.append((None, str(e)))
                break
            except Exception as e:  # the tracker went away mid-search
                attempts.append((None, f"tracker {self.tracker}: {error_line(e, with_type=True)}"))
                break
            with self._lock:
                self.busy.add(board)
                self.peak_busy = max(self.peak_busy, len(self.busy))
            t0 = time.perf_counter()
            try:
                m = time_remote(remote, lib_path, arrays, device=self.device, repeat=self.repeat,
                                min_repeat_ms=self.min_repeat_ms, timer=self.timer)
                with self._lock:
                    self.lost.pop(board, None)
                return replace(m, board=board, attempts=tuple(attempts))
            except Exception as e:  # disconnected, timed out (session killed) or crashed: data, not a crash
                err = f"board {board}: {error_line(e, with_type=True)}"
                attempts.append((board, err))
                with self._lock:
                    self.lost[board] = err
                log.warning("measurement failed on %s (%s)%s", board, error_line(e),
                            "; retrying on another board" if len(attempts) < 2 else "")
            finally:
                with self._lock:
                    self.busy.discard(board)
                    self.board_seconds += time.perf_counter() - t0
                del remote
        board, err = attempts[-1]
        return Measurement(None, error=err, board=board, attempts=tuple(attempts[:-1]))

    def status(self) -> dict:
        """Boards busy, idle and lost right now (for the progress bar), and how many were refused."""
        with self._lock:
            lost = set(self.lost) & self.accepted
            busy = self.busy - lost
            return {"busy": len(busy), "idle": len(self.accepted - busy - lost), "lost": len(lost),
                    "refused": len(self.refused)}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def tracker_table(tracker: str):
    """``hago devices --rpc HOST:PORT``: per key, the boards the tracker holds (free and in use) and their
    addresses, as a rich table; a one-line :class:`MeasureError` if the tracker does not answer."""
    from rich.table import Table

    from .rpc import tracker_summary

    summary = tracker_summary(tracker)
    addresses: dict[str, list[str]] = {}
    for server in summary.get("server_info") or []:
        key = str(server.get("key", "")).removeprefix("server:")
        addr = server.get("addr") or ["?", "?"]
        addresses.setdefault(key, []).append(f"{addr[0]}:{addr[1]}")
    table = Table(title=f"RPC tracker {tracker}")
    for col in ("key", "free", "in use", "boards"):
        table.add_column(col)
    keys = sorted(set(summary["queue_info"]) | set(addresses))
    for key in keys:
        q = summary["queue_info"].get(key, {})
        table.add_row(key, str(q.get("free", 0)), str(q.get("pending", 0)), " ".join(sorted(addresses.get(key, []))))
    if not keys:
        table.add_row("(none)", "0", "0", "no board has registered")
    return table
