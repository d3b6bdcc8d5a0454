"""TVMScript, made fast enough to parse kernels at build time: one fix to TVM 0.27's macro expansion.

hago's row kernels (softmax, layer norm, row quantize) and AMX kernels are
TVMScript functions built from ``T.macro`` pieces, parsed for each shape a
model needs. Every macro call looks for the parser among its caller frames
with ``inspect.getouterframes``, which also reads each frame's source line
from disk: under a deep stack (a search, a test run) that costs ~0.1 s a
call, and a ViT block's build spent 9 of its 13 s there. Walking
``frame.f_back`` finds the same parser (the innermost frame whose globals
hold it) without touching a source file.
"""

from __future__ import annotations

import sys

from tvm.script.parser.core.parser import ScriptMacro


def _find_parser_def(self):
    """:meth:`ScriptMacro._find_parser_def` without reading source files (same frames, same order)."""
    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


ScriptMacro._find_parser_def = _find_parser_def
