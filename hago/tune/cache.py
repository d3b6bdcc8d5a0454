"""The on-disk tuning cache: one MetaSchedule ``JSONDatabase`` per (device, workload).

Layout, under ``cache_dir`` (``~/.cache/hago/tuning`` or ``$HAGO_CACHE_DIR``)::

    v{SCHEMA}/{device_key}/{key}/database_workload.json       MetaSchedule's own files
                                 database_tuning_record.json
                                 meta.json                    budget and trials spent, for humans too

``key`` hashes an explicit dict (schema, TVM version, target, the workload's
structural hash), so a new TVM, a changed target or a schema bump lands in a
new folder instead of misreading old records (tinygrad's versioned disk
cache). One folder per workload keeps a build's loading proportional to its
own tasks, and a task name never enters the key: FuseOps numbers its
functions (``fused_add3_...``) differently from model to model, while the
workload itself is the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import tvm

from ..errors import error_line

log = logging.getLogger(__name__)

SCHEMA = 1
CACHE_ENV = "HAGO_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/hago/tuning"


def default_cache_dir() -> Path:
    """``$HAGO_CACHE_DIR`` if set, else ``~/.cache/hago/tuning``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "device"


def workload_hash(mod: tvm.IRModule) -> str:
    """Structural hash of a task's IRModule (deterministic across processes)."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod):016x}"


@dataclass
class Entry:
    """The cache folder of one workload on one device."""

    folder: Path
    key: dict

    @property
    def meta_path(self) -> Path:
        return self.folder / "meta.json"

    def meta(self) -> dict:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}
        return meta if meta.get("key") == self.key else {}  # a hash collision reads as empty

    @property
    def budget(self) -> int:
        """The largest per-task budget this workload was tuned to (0: never)."""
        return int(self.meta().get("budget", 0))

    @property
    def has_records(self) -> bool:
        return self.records_path.is_file() and self.records_path.stat().st_size > 0

    @property
    def records_path(self) -> Path:
        return self.folder / "database_tuning_record.json"

    def intrinsics(self) -> set[str]:
        """Tensor intrinsics the records tensorize with: loading them replays their traces.

        A record line is ``[workload, [trace, run_secs, target, args]]`` and a
        trace ``[[instruction, ...], decisions]`` with instructions ``[kind,
        inputs, attrs, outputs]``; ``Tensorize`` names its intrinsic first.
        """
        names = set()
        try:
            lines = self.records_path.read_text().splitlines()
        except OSError:
            return names
        for line in lines:
            try:
                for inst in json.loads(line)[1][0][0]:
                    if inst[0] == "Tensorize" and inst[2]:
                        names.add(str(inst[2][0]))
            except (ValueError, IndexError, TypeError):
                continue  # a malformed line: database() finds it too
        return names

    def database(self):
        """This workload's ``JSONDatabase`` (created empty if absent).

        Register the tensor intrinsics of ``intrinsics()`` first. A database
        that still fails to load (a line cut short by a killed run) is moved
        aside to ``<folder>.bad`` and this workload starts over: it is a cache.
        """
        from tvm.s_tir import meta_schedule as ms

        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            return ms.database.JSONDatabase(work_dir=str(self.folder))
        except Exception as e:
            msg = error_line(e, limit=None)
            if "not registered" in msg:  # a missing intrinsic is our bug, not a corrupt cache
                raise
            bad = self.folder.with_name(self.folder.name + ".bad")
            log.warning("tuning cache %s unreadable (%s): moved to %s", self.folder, msg, bad.name)
            shutil.rmtree(bad, ignore_errors=True)
            os.replace(self.folder, bad)
            self.folder.mkdir(parents=True, exist_ok=True)
            return ms.database.JSONDatabase(work_dir=str(self.folder))

    @property
    def default_schedule(self) -> str | None:
        """Fingerprint of the default schedule committed as a record (None: none yet)."""
        return self.meta().get("default_schedule")

    def record(self, *, task: str, budget: int, trials: int, failed: int, default_ms: float | None = None,
               default_schedule: str | None = None) -> None:
        """Add a finished tuning round to ``meta.json`` (atomically replaced)."""
        old = self.meta()
        meta = {
            "key": self.key,
            "task": task,
            "budget": max(budget, int(old.get("budget", 0))),
            "trials": int(old.get("trials", 0)) + trials,
            "failed_trials": int(old.get("failed_trials", 0)) + failed,
            "default_ms": default_ms if default_ms is not None else old.get("default_ms"),
            "default_schedule": default_schedule if default_schedule is not None else old.get("default_schedule"),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.meta_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, self.meta_path)


class TuningCache:
    """Folders of ``cache_dir`` for one device key and target."""

    def __init__(self, cache_dir: str | Path, device_key: str, target: tvm.target.Target):
        self.root = Path(cache_dir).expanduser() / f"v{SCHEMA}" / _slug(device_key)
        self.target_json = json.dumps(target.export(), sort_keys=True, default=str)

    def entry(self, mod: tvm.IRModule) -> Entry:
        key = {"schema": SCHEMA, "tvm": tvm.__version__, "target": self.target_json, "workload": workload_hash(mod)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return Entry(self.root / digest, key)
