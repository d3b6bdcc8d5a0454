"""A toy backend that lives in the test directory: a generic LLVM CPU with no intrinsics.

No plan beyond plain integer Relax ops (no VNNI, no blocked layout), no
kernel swap after realize, no tuning; it builds with ``hago.lower``'s CPU
pipeline and exports a plain shared library. Registering it
(``register_backend("toy", ToyCPU())``) is all it takes for a spec with
``backend: toy`` to compile: ``hago.compile``, the search, ``hago.build``
and the CLI are not edited for it. It records what it built, so a test can
see it was the one used.
"""

from __future__ import annotations

from pathlib import Path

from hago.backends import Backend


class ToyCPU(Backend):
    target_kind = "llvm"
    device = "cpu"
    tunable = False
    layouts = frozenset({None, "NCHW"})
    weight_layouts = frozenset({None, "OIHW"})

    def __init__(self):
        self.built: list[str] = []  # ``what`` of every build it made
        self.rewritten = 0
        self.exported: list[Path] = []

    def rewrite(self, mod, spec, target):
        self.rewritten += 1
        return mod

    def build(self, mod, target, *, what: str = "target", tune=None):
        from hago.lower import finish, fuse

        self.built.append(what)
        return finish(fuse(mod, target), target)

    def export(self, executable, spec, path: Path) -> Path:
        executable.export_library(str(path))
        self.exported.append(path)
        return path
