"""``--threads N`` read from the command line before TVM is imported: TVM reads ``TVM_NUM_THREADS`` once, when
its thread pool starts, so a benchmark script calls :func:`from_argv` before its other imports."""

from __future__ import annotations

import os
import sys


def from_argv(default: str = "1") -> str:
    """The value after ``--threads`` (else ``default``), put into ``TVM_NUM_THREADS`` unless that is set."""
    threads = default
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            threads = sys.argv[i + 1]
    os.environ.setdefault("TVM_NUM_THREADS", threads)
    return threads
