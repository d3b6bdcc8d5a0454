"""The search log: append-only JSONL, one line per measured candidate, flushed as it goes.

A search killed at any moment (``kill -9`` included) leaves every finished
measurement on disk; ``hago search --resume LOG`` reads them back and never
measures a candidate twice. The first line is a header that pins the graph,
device, target and space, so a log is never resumed against another problem.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .target import SearchError

LOG_VERSION = 1


class SearchLog:
    def __init__(self, path: str | Path, header: dict):
        self.path = Path(path)
        self.header = {"log_version": LOG_VERSION, **header}
        self.records: dict[str, dict] = {}
        if self.path.exists() and self.path.stat().st_size:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"header": self.header})

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        try:
            first = json.loads(lines[0])["header"]
        except (json.JSONDecodeError, KeyError, IndexError):
            raise SearchError(f"{self.path} is not a hago search log (no header line)") from None
        for key in ("log_version", "graph_hash", "device", "space"):
            if first.get(key) != self.header.get(key):
                raise SearchError(f"{self.path} was written for another {key} ({first.get(key)!r}); start a new log")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that candidate is simply measured again
            self.records[rec["key"]] = rec

    def _append(self, obj: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, record: dict) -> dict:
        record = {**record, "time": time.time()}
        self.records[record["key"]] = record
        self._append(record)
        return record
