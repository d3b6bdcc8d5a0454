"""Turn the PrimFuncs TVM's ONNX importer emits for ``Clip`` and ``Pad`` back into Relax ops.

TVM 0.27's ONNX importer lowers ``Clip`` to ``call_tir`` of ``topi.maximum`` /
``topi.minimum`` and ``Pad`` to ``call_tir`` of ``topi.nn.pad`` (``emit_te``),
each a PrimFunc it adds to the module. To hago such a call is an opaque op:
a ReLU6 after a conv would run in float (the conv dequantizes, the next
layer quantizes again), and a zero "same" pad could not be folded into the
conv's padding, so EfficientNet-style convs would keep a float pad in front.

:func:`restore_relax_ops` recognises a helper by *rebuilding* it: a call is
replaced only when its PrimFunc is structurally equal to the one
``BlockBuilder.emit_te`` creates for that topi op on the same arguments (the
importer's own call, replayed), so the Relax op computes exactly what the
helper did. Then
``minimum(maximum(x, lo), hi)`` with scalar constants becomes
``clip(x, lo, hi)`` (a ``maximum`` or ``minimum`` alone, a one-sided clip),
and a constant pad ``nn.pad``, which ``prepare.fold_pad_into_conv`` folds.
Helpers it does not recognise stay as they are (``prepare``'s dead-code
elimination drops the ones no longer called).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, topi
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.sym.analyzer import Analyzer

from .relax_rewrite import rewrite_relax_functions

__all__ = ["restore_relax_ops"]

#: at most this many (before, after) splits of a pad's growth are tried per call
_MAX_PAD_CANDIDATES = 256


def restore_relax_ops() -> tvm.transform.Pass:
    """Replace importer ``call_tir`` helpers (Clip's max/min, constant Pad) by Relax ops (see module doc)."""
    return _RestoreRelaxOps()


@tvm.transform.module_pass(opt_level=0, name="hago.RestoreRelaxOps")
class _RestoreRelaxOps:
    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(mod, _Restore(mod))


def _shape(expr) -> list | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return list(ty.shape.values)


def _scalar(expr) -> float | None:
    """The value of a one-element float constant, else None."""
    if isinstance(expr, tvm.ir.expr.Constant):
        v = expr.value.numpy()
        if v.size == 1 and np.issubdtype(v.dtype, np.floating):
            return float(v.reshape(()))
    return None


def _same(func: tvm.tirx.PrimFunc, candidate: tvm.tirx.PrimFunc) -> bool:
    a = candidate.without_attr("global_symbol")
    b = func.without_attr("global_symbol")
    return bool(tvm_ffi.structural_equal(a, b, map_free_vars=True))


def _emitted(fn, args, *extra) -> tvm.tirx.PrimFunc | None:
    """The PrimFunc ``BlockBuilder.emit_te(fn, *args, *extra)`` creates, as the importer called it."""
    if any(_shape(a) is None for a in args):
        return None
    bb = relax.BlockBuilder()
    params = [relax.Var(f"a{i}", a.ty) for i, a in enumerate(args) if not isinstance(a, tvm.ir.expr.Constant)]
    it = iter(params)
    call_args = [a if isinstance(a, tvm.ir.expr.Constant) else next(it) for a in args]
    try:
        with bb.function("f", params):
            with bb.dataflow():
                out = bb.emit_output(bb.emit_te(fn, *call_args, *extra))
            bb.emit_func_output(out)
    except Exception:  # noqa: BLE001 - shapes fn does not take: not this helper
        return None
    funcs = [f for _, f in bb.get().functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return funcs[0] if len(funcs) == 1 else None


def _is_topi(func, args, fn, *extra) -> bool:
    """Whether ``func`` is what ``emit_te(fn, *args, *extra)`` gives."""
    cand = _emitted(fn, args, *extra)
    return cand is not None and _same(func, cand)


def _float_imms(func) -> list[float]:
    found = []
    tvm_ffi.structural_walk(func.body, (tvm.tirx.FloatImm, lambda v: found.append(float(v.value))))
    return found


def _pad_width(func, x, out_shape) -> tuple[list[int], float] | None:
    """``(pad_width, value)`` of an ``nn.pad`` equal to ``func`` applied to ``x``, or None."""
    in_shape = _shape(x)
    if in_shape is None or len(in_shape) != len(out_shape):
        return None
    ana = Analyzer()
    grow = []
    for i, o in zip(in_shape, out_shape):
        d = ana.simplify(o - i)
        if not isinstance(d, tvm.tirx.IntImm) or int(d) < 0:
            return None
        grow.append(int(d))
    if math.prod(g + 1 for g in grow) > _MAX_PAD_CANDIDATES:
        return None
    values = list(dict.fromkeys([0.0, *_float_imms(func)]))
    for before in itertools.product(*(range(g + 1) for g in grow)):
        after = [g - b for g, b in zip(grow, before)]
        for value in values:
            if _is_topi(func, [x], topi.nn.pad, list(before), after, value):
                return [w for b, a in zip(before, after) for w in (b, a)], value
    return None


@mutator
class _Restore(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.known: dict = {}  # helper GlobalVar -> what it computes (its PrimFunc fixes the shapes)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir") or len(call.args) > 2:
            return call
        gv, args = call.args[0], list(call.args[1].fields)
        if gv not in self.known:
            func = self.mod_[gv] if gv in self.mod_.get_global_vars() else None
            self.known[gv] = self._recognise(func, args, call) if isinstance(func, tvm.tirx.PrimFunc) else None
        found = self.known[gv]
        if found is None or (found[0] != "pad" and _scalar(args[1]) is None):  # a call with a tensor bound
            return call
        if found[0] == "maximum":
            return self._one_sided(args[0], lo=_scalar(args[1]))
        if found[0] == "minimum":
            return self._one_sided(args[0], hi=_scalar(args[1]))
        _, width, value = found
        return relax.op.nn.pad(args[0], width, "constant", value)

    @staticmethod
    def _recognise(func, args, call) -> tuple | None:
        """``("maximum",)``, ``("minimum",)`` (with a scalar constant), ``("pad", width, value)`` or None."""
        out_shape = _shape(call)
        if out_shape is None:
            return None
        if len(args) == 2 and _scalar(args[1]) is not None and _shape(args[0]) is not None:
            for name, fn in (("maximum", topi.maximum), ("minimum", topi.minimum)):
                if _is_topi(func, args, fn):
                    return (name,)
        if len(args) == 1:
            found = _pad_width(func, args[0], out_shape)
            if found is not None:
                return ("pad", *found)
        return None

    def _one_sided(self, x, lo: float = -math.inf, hi: float = math.inf) -> relax.Expr:
        """``clip(x, lo, hi)``; a minimum right after a one-sided maximum (ONNX Clip) merges into one clip."""
        inner = self.lookup_binding(x) if isinstance(x, relax.Var) else None
        if isinstance(inner, relax.Call) and isinstance(inner.op, tvm.ir.Op) and inner.op.name == "relax.clip":
            ilo, ihi = float(inner.args[1].value), float(inner.args[2].value)
            # min(max(y, ilo), hi) == clip(y, ilo, hi) only while ilo <= hi
            if math.isinf(ihi) and math.isinf(lo) and ilo <= hi:
                return relax.op.clip(inner.args[0], ilo, hi)
        return relax.op.clip(x, lo, hi)
