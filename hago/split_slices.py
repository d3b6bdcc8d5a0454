"""``split(x)[i]`` as ``strided_slice(x)``: every tensor in ``main`` comes from a call.

``torch.chunk`` / ``torch.split`` (ShuffleNet's channel split, gated units)
export as ONNX ``Split``, which TVM imports as one ``split`` call returning a
tuple, read by ``TupleGetItem`` bindings. hago's graph (:func:`hago.graph.analyze`)
is made of calls, one edge per call: a layer reading a tuple's field would
have no input edge, and calibration, realize and simulate could not place a
quantizer on it. Each field read of a ``split`` whose axis has a static size
becomes the ``strided_slice`` it is, so the edge is an ordinary call's output
(the slice runs in float, like any op without an integer form); the ``split``
itself is then dead code. A split on a symbolic axis (the batch) is left as
it is.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_rewrite import rewrite_relax_functions

__all__ = ["split_as_slices"]


def split_as_slices() -> tvm.transform.Pass:
    """The prepare pass (module docstring)."""
    return _SplitAsSlices()


@tvm.transform.module_pass(opt_level=0, name="hago.SplitAsSlices")
class _SplitAsSlices:
    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_relax_functions(mod, _Slicer(mod))


def split_bounds(extent: int, indices_or_sections) -> list[tuple[int, int]]:
    """``[(begin, end)]`` of each part of ``split`` along an axis of ``extent`` (Relax's semantics: an int is
    that many sections of ``ceil(extent / n)``, the last one shorter where it does not divide; a list, the
    indices where parts begin)."""
    if isinstance(indices_or_sections, int):
        size = -(-extent // indices_or_sections)
        cuts = [min(i * size, extent) for i in range(indices_or_sections + 1)]
        return list(zip(cuts[:-1], cuts[1:]))
    cuts = [0, *[min(max(int(i), 0), extent) for i in indices_or_sections], extent]
    return list(zip(cuts[:-1], cuts[1:]))


@mutator
class _Slicer(PyExprMutator):
    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        op = super().visit_tuple_getitem_(op)
        tup = op.tuple_value
        split = self.lookup_binding(tup) if isinstance(tup, relax.Var) else None
        if not (isinstance(split, relax.Call) and isinstance(split.op, tvm.ir.Op)
                and split.op.name == "relax.split"):
            return op
        x = split.args[0]
        ty = x.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
            return op
        axis = int(split.attrs.axis) % len(ty.shape.values)
        extent = ty.shape.values[axis]
        if not isinstance(extent, tvm.tirx.IntImm):
            return op
        ios = split.attrs.indices_or_sections
        parts = split_bounds(int(extent), int(ios) if isinstance(ios, (int, tvm.tirx.IntImm)) else list(ios))
        begin, end = parts[int(op.index)]
        return relax.op.strided_slice(x, axes=[axis], begin=[begin], end=[end])
