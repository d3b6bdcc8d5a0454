"""Filter what TVM's C++ side prints to stderr around calls whose warnings mean nothing to a user.

TVM 0.27 logs ``executable.cc:276: Warning: Scope Saving: ...`` once per
function when a Relax executable is exported, 18 lines for the MNIST demo.
It is an internal note (the VM saves the storage scope of each buffer), not
something a user can act on; the importers add others (:data:`HARMLESS`). Native code writes straight to file descriptor
2, so Python's ``sys.stderr`` cannot catch it: :func:`drop_native_lines`
points fd 2 at a temporary file for the duration of the call and replays
every line that does not match, so real errors still reach the user.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

#: Native log lines hago hides; each is a known TVM message a user cannot act on:
#: the VM's per-function note on export; the importer's warning on every ``take(mode="fast")``, which
#: ``hago.safe_index`` rewrites to a bounded mode; and the block builder's complaint after an importer
#: error, which hago reports in its own line.
HARMLESS = re.compile(r"Warning: Scope Saving:|Fast mode segfaults when there are out-of-bounds indices"
                      r"|BlockBuilder destroyed with remaining blocks")


@contextlib.contextmanager
def drop_native_lines(pattern: re.Pattern = HARMLESS):
    """Hide native stderr lines matching ``pattern`` while the block runs; other lines are re-emitted."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # captured or replaced stderr (pytest, notebooks)
        fd = 2
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not pattern.search(line)]
            if kept:
                os.write(fd, "".join(kept).encode())
