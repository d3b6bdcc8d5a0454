"""The search log: append-only JSONL, one line per measured candidate, flushed as it goes.

Records are keyed ``KIND|POINT``: ``accuracy``, ``latency`` (and each
failed ``attempt``), ``kernels`` (the candidate's kernel calls) and ``bytes``
(its realized weight bytes, counted once: a resumed search reads them back).

A search killed at any moment (``kill -9`` included) leaves every finished
measurement on disk; ``hago search --resume LOG`` reads them back and never
measures a candidate twice. The first line is a header that pins the graph,
device, target and space, so a log is never resumed against another problem.

A kill during a write can leave the last line torn (half a record, no
newline). On opening, that line is cut off before anything is appended, so
the next record starts on a line of its own; the one candidate it held is
measured again. Any other line that is not a record is damage a kill cannot
cause, so it is a one-line :class:`SearchError` naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from .target import SearchError

log = logging.getLogger(__name__)

LOG_VERSION = 1


def check_resumable(path: str | Path) -> Path:
    """``path`` if it holds a search to resume; a one-line :class:`SearchError` otherwise.

    Called before the (slow) set-up of a search, so ``--resume`` with a wrong
    path or a damaged log fails at once instead of silently starting a new
    search or failing minutes later. A torn last line is allowed here (it is
    cut off when the log is opened); whether the log belongs to this model
    and device is checked then too.
    """
    path = Path(path)
    if not path.exists():
        raise SearchError(f"cannot resume {path}: no such log (start a new search with --log {path})")
    if not path.is_file():
        raise SearchError(f"cannot resume {path}: not a file")
    data = path.read_bytes()
    if not data:
        raise SearchError(f"cannot resume {path}: the log is empty (start a new search with --log {path})")
    data = data[:data.rfind(b"\n") + 1]
    if not data:
        raise SearchError(f"cannot resume {path}: its only line was cut short, so it holds no search "
                          f"(start a new search with --log {path})")
    _parse(path, data)
    return path


def _parse(path: Path, data: bytes) -> tuple[dict, dict[str, dict]]:
    """The header and the records of newline-terminated log text; a one-line SearchError at the first bad line."""
    try:
        lines = data.decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError:
        raise SearchError(f"{path} is not a hago search log (not UTF-8 text)") from None
    try:
        first = json.loads(lines[0])
        first = first["header"] if isinstance(first, dict) else None
    except (ValueError, KeyError, IndexError, RecursionError):
        first = None
    if not isinstance(first, dict):
        raise SearchError(f"{path} is not a hago search log (no header line)")
    records: dict[str, dict] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:
            problem = f"not a JSON record ({getattr(e, 'msg', type(e).__name__)})"
        else:
            problem = _record_problem(rec)
        if problem:
            raise SearchError(f"{path}:{number}: {problem}; delete that line to resume, or start a new log")
        records[rec["key"]] = rec
    return first, records


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # NaN too: a user's metric may give it


def _record_problem(rec) -> str | None:
    """Why ``rec`` is not a record the engine can use, or None."""
    if not isinstance(rec, dict):
        return f"not a search record (a JSON {type(rec).__name__}, expected an object)"
    key = rec.get("key")
    if not isinstance(key, str) or not key:
        return 'a record without a "key"'
    if "point" in rec and not (isinstance(rec["point"], list)
                               and all(isinstance(b, int) and not isinstance(b, bool) for b in rec["point"])):
        return f"record {key!r} has a malformed point"
    kind = key.partition("|")[0]
    if kind in ("accuracy", "latency") and "point" not in rec:
        return f"record {key!r} has no point"
    if kind == "accuracy" and not _is_number(rec.get("accuracy")):
        return f"record {key!r} has no accuracy"
    if kind == "latency" and not ((rec.get("latency_ms") is None or _is_number(rec["latency_ms"]))
                                  and (rec.get("error") is None or isinstance(rec["error"], str))):
        return f"record {key!r} has a malformed latency or error"
    if kind in ("latency", "attempt") and not (rec.get("board") is None or isinstance(rec["board"], str)):
        return f"record {key!r} has a malformed board"
    if kind == "bytes" and not (isinstance(rec.get("weight_bytes"), int) and not isinstance(rec["weight_bytes"], bool)
                                and rec["weight_bytes"] >= 0):
        return f"record {key!r} has malformed weight bytes"
    if kind == "kernels" and not (isinstance(rec.get("signatures"), list)
                                  and all(isinstance(s, str) for s in rec["signatures"])):
        return f"record {key!r} has malformed kernel signatures"
    return None


class SearchLog:
    """The records of one search, keyed by ``record["key"]``.

    With ``resume`` the log must exist and hold a search (see
    :func:`check_resumable`); without it a missing or empty log is started.
    """

    def __init__(self, path: str | Path, header: dict, *, resume: bool = False):
        self.path = Path(path)
        self.header = {"log_version": LOG_VERSION, **header}
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()  # a farm's boards report from their own threads
        if resume:
            check_resumable(self.path)
        if self.path.exists() and self.path.stat().st_size and self._mend():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"header": self.header})

    def _mend(self) -> bool:
        """End the file on a newline: cut a torn last line off (or end a whole one). False if nothing is left."""
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return True
        cut = data.rfind(b"\n") + 1
        try:
            whole = cut > 0 and _record_problem(json.loads(data[cut:])) is None
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            whole = False
        if whole:  # the record was written in full, only its newline is missing
            with self.path.open("ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            return True
        with self.path.open("r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        log.warning("%s: cut off its last line (%d bytes, torn by a killed search); that candidate is "
                    "measured again", self.path, len(data) - cut)
        return cut > 0

    def _load(self) -> None:
        first, self.records = _parse(self.path, self.path.read_bytes())
        # the metric too: an accuracy record is a score on it (agreement, top-1, minus KL), not a pass/fail
        for key in ("log_version", "graph_hash", "device", "space", "metric"):
            if first.get(key) != self.header.get(key):
                raise SearchError(f"{self.path} was written for another {key} ({first.get(key)!r}); start a new log")

    def _append(self, obj: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def snapshot(self) -> list[tuple[str, dict]]:
        """The records as they are now (a copy: boards may add while the caller iterates)."""
        with self._lock:
            return list(self.records.items())

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, record: dict) -> dict:
        record = {**record, "time": time.time()}
        with self._lock:
            self.records[record["key"]] = record
            self._append(record)
        return record
