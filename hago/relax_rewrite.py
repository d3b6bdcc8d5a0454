"""Run one expression mutator over every Relax function of a module: the driver hago's rewrites share.

prepare's passes (constant commuting, Conv1d as conv2d, importer helpers back
to Relax ops, bounded indexing) and the backends' int8 kernel swap are each a
``PyExprMutator`` made on the module; this applies it to each Relax function
and returns the rewritten module. Fused ``Primitive`` functions (FuseOps'
output) are kernels, not graph: they are left alone.
"""

from __future__ import annotations

import tvm
from tvm import relax


def rewrite_relax_functions(mod: tvm.IRModule, mutator) -> tvm.IRModule:
    """``mutator`` (a ``PyExprMutator`` built on ``mod``) applied to each non-primitive Relax function."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function) and not (func.attrs is not None and int(func.attrs.get("Primitive", 0))):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
