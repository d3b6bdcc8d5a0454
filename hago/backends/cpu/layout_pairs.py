"""Drop layout round trips: ``layout_transform`` to a layout and straight back, with element-wise ops between.

Where a blocked ``NCHW{b}c`` tensor meets a plain-layout op and the plain
value then feeds a blocked op again, the module holds

    u = layout_transform(a, M1)        # NCHW{b}c -> NCHW
    v = op_k(... op_1(u, c1) ..., ck)  # element-wise, other operands constant
    w = layout_transform(v, M2)        # NCHW -> NCHW{b}c, M2 the inverse of M1

which Relax ``ConvertLayout`` leaves in place: it converts each op from the
layout of its input and never looks for the pair. This happens at every
boundary between the x86 plan's blocked integer kernels and the float
convolutions that ConvertLayout blocks (:mod:`.float_layout`): an int8 conv
feeding a float one (its int32 accumulator, bias, dequantize and activation
between the two transforms), and a float conv feeding an int8 one.

:func:`cancel_layout_pairs` runs the element-wise ops on ``a`` itself, in the
blocked layout (each constant re-laid out to match, at compile time), and
gives ``w``'s users that value. It rewrites only where

* ``M2`` after ``M1`` is the identity on ``a``'s shape and neither transform
  pads (the element counts agree), so no padded lane can differ;
* each op is element-wise with one tensor operand from the chain and only
  constants (or scalars) besides, and every constant re-lays out exactly
  (a scalar, or a shape whose blocked form the maps determine);
* every value of the chain is used only by the next op of the chain or by
  a transform that undoes ``M1``: no plain-layout user is left needing it.

Anything else is left as it was: the result is the same computation with
fewer passes over memory, or the module unchanged.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.ir.expr import Constant  # tensor constants and scalar immediates alike (TVM 0.27)
from tvm.sym import Analyzer

log = logging.getLogger(__name__)

_LT = "relax.layout_transform"
#: ops that compute each output element from the same element of their tensor operand (and broadcast constants)
ELEMENTWISE = frozenset({
    "relax.nn.relu", "relax.nn.silu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.leakyrelu",
    "relax.sigmoid", "relax.tanh", "relax.exp", "relax.negative", "relax.abs", "relax.round", "relax.floor",
    "relax.ceil", "relax.sqrt", "relax.rsqrt", "relax.astype", "relax.clip",
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
    "relax.power", "relax.quantize", "relax.dequantize",
})
#: element-wise ops with an ``axis`` attribute: per-channel constants along it would change meaning
_AXIS_OPS = frozenset({"relax.quantize", "relax.dequantize"})
MAX_CONST = 1 << 16  # constants re-laid out element by element at compile time: per-channel vectors, not images


def _op(expr) -> str:
    return getattr(getattr(expr, "op", None), "name", "") if isinstance(expr, relax.Call) else ""


def _static(shape) -> list[int] | None:
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):
        return None


def _shape(expr) -> list[int] | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    values = getattr(shape, "values", None)
    return None if values is None else _static(values)


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _imm(e) -> int:
    return int(Analyzer().simplify(e))


def undoes(m1, m2, a_shape: list[int], u_shape: list[int], w_shape: list[int]) -> bool:
    """Whether ``m2(m1(i)) == i`` for every index ``i`` of ``a_shape``, neither map padding."""
    if a_shape != w_shape or int(np.prod(a_shape)) != int(np.prod(u_shape)):
        return False
    if len(m1.initial_indices) != len(a_shape) or len(m2.initial_indices) != len(u_shape):
        return False
    if len(m2.final_indices) != len(a_shape):
        return False
    ana = Analyzer()
    idx = [tirx.Var(f"i{k}", "int64") for k in range(len(a_shape))]
    for v, ext in zip(idx, a_shape):
        ana.bind(v, tvm.ir.Range.from_min_extent(tirx.const(0, "int64"), tirx.const(ext, "int64")))
    try:
        back = m2.map_indices(list(m1.map_indices(idx)))
        return all(ana.can_prove_equal(b, v) for b, v in zip(back, idx))
    except Exception:  # noqa: BLE001 - a map this check cannot compose is not a round trip
        return False


def relayout_const(value: np.ndarray, m2, u_shape: list[int], a_shape: list[int]) -> np.ndarray | None:
    """``value`` (broadcast against ``u_shape``) in the layout ``m2`` maps ``u_shape`` to; None if not exact.

    A scalar stays as it is. Otherwise each blocked axis either depends only
    on axes where ``value`` is full (it then gets the blocked extent) or only
    on axes where it broadcasts (extent 1); a mix has no broadcast form.
    """
    value = np.asarray(value)
    if value.size == 1:
        return value.reshape(())
    if value.ndim > len(u_shape) or value.size > MAX_CONST:
        return None
    s = [1] * (len(u_shape) - value.ndim) + list(value.shape)
    if any(d not in (1, u) for d, u in zip(s, u_shape)):
        return None
    value = value.reshape(s)
    ins, outs = list(m2.initial_indices), list(m2.final_indices)
    full = [v for v, d, u in zip(ins, s, u_shape) if d == u and u > 1]
    flat = [v for v, d, u in zip(ins, s, u_shape) if d == 1 and u > 1]
    target = []
    for k, e in enumerate(outs):
        on_full, on_flat = any(_uses(e, v) for v in full), any(_uses(e, v) for v in flat)
        if on_full and on_flat:
            return None
        target.append(a_shape[k] if on_full else 1)
    if int(np.prod(target)) != value.size:
        return None
    out = np.empty(target, value.dtype)
    seen = np.zeros(target, bool)
    for i in itertools.product(*(range(d) for d in s)):
        pos = [_imm(e) if t > 1 else 0 for e, t in zip(m2.map_indices([tirx.const(x, "int64") for x in i]), target)]
        if seen[tuple(pos)]:
            return None
        out[tuple(pos)], seen[tuple(pos)] = value[i], True
    return out


def _split(call) -> int | None:
    """The index of the one tensor operand of ``call`` (a Var), every other operand a constant or a scalar."""
    tensor = [k for k, a in enumerate(call.args) if not isinstance(a, Constant)]
    return tensor[0] if len(tensor) == 1 and isinstance(call.args[tensor[0]], relax.Var) else None


def _blocked_args(call, k: int, m2, u_shape, a_shape) -> list | None:
    """``call``'s operands for the blocked layout (slot ``k``, the tensor, left None); None if one does not fit."""
    args = []
    for j, arg in enumerate(call.args):
        if j == k:
            args.append(None)
        elif isinstance(getattr(arg, "value", None), tvm.runtime.Tensor):  # a tensor constant (scalars stay)
            c = arg.value.numpy()
            if _op(call) in _AXIS_OPS and c.size != 1:
                return None
            r = relayout_const(c, m2, u_shape, a_shape)
            if r is None:
                return None
            args.append(relax.const(r, str(arg.ty.dtype)))
        else:
            args.append(arg)
    return args


def _plans(func: relax.Function) -> tuple[dict, dict]:
    """``(chain var -> (its call, tensor slot, blocked operands, previous var), undone transform var -> source)``.

    The source of an undone transform is the chain var whose blocked value
    replaces it, or ``a`` itself for a direct pair.
    """
    value_of, users = {}, {}
    for blk in func.body.blocks:
        for b in blk.bindings:
            if isinstance(b, relax.VarBinding):
                value_of[b.var] = b.value
            for v in relax.analysis.free_vars(b.value):
                users.setdefault(v, []).append(b.var)
    for v in relax.analysis.free_vars(func.body.body):
        users.setdefault(v, []).append(None)  # the function's result: a plain-layout user

    def undone(var, a, u, m1) -> bool:
        """``var = lt(x, m2)`` with ``m2`` undoing ``u = lt(a, m1)``, inside the dataflow block (so that any
        value may replace it)."""
        val = value_of.get(var)
        if _op(val) != _LT or not isinstance(var, relax.DataflowVar):
            return False
        a_s, u_s, w_s = _shape(a), _shape(u), _shape(var)
        return None not in (a_s, u_s, w_s) and undoes(m1, val.attrs.index_map, a_s, u_s, w_s)

    chains: dict = {}
    cancelled: dict = {}
    # ConvertLayout converts a value once per consumer: the same transform of the same value, computed again
    seen: list = []
    for w, val in value_of.items():
        if _op(val) == _LT and isinstance(val.args[0], relax.Var) and isinstance(w, relax.DataflowVar):
            first = next((x for x, v in seen if v.args[0].same_as(val.args[0])
                          and tvm_ffi.structural_equal(v.attrs, val.attrs)), None)
            if first is None:
                seen.append((w, val))
            else:
                cancelled[w] = first
    for w, val in value_of.items():
        if _op(val) != _LT or not isinstance(val.args[0], relax.Var) or w in cancelled:
            continue
        chain, cur = [], val.args[0]
        while _op(value_of.get(cur)) in ELEMENTWISE and (k := _split(value_of[cur])) is not None:
            chain.append((cur, k))
            cur = value_of[cur].args[k]
        src = value_of.get(cur)
        if _op(src) != _LT or not isinstance(src.args[0], relax.Var):
            continue
        a, u, m1 = src.args[0], cur, src.attrs.index_map
        if not undone(w, a, u, m1):
            continue
        chain.reverse()  # from u towards w
        names = [v for v, _ in chain]
        if any(_shape(v) != _shape(u) for v in names):  # a constant that broadcasts the tensor up: not a copy
            continue
        if any(v in chains for v in names):
            continue  # already planned from another transform that undoes it
        # every chain value feeds only the next op or transforms that undo m1: none is needed plain
        if any(x is None or (not (nxt is not None and x.same_as(nxt)) and not undone(x, a, u, m1))
               for v, nxt in zip(names, names[1:] + [None]) for x in users.get(v, [])):
            continue
        m2, u_shape, a_shape = val.attrs.index_map, _shape(u), _shape(a)
        ops = [(v, k, _blocked_args(value_of[v], k, m2, u_shape, a_shape)) for v, k in chain]
        if any(args is None for _, _, args in ops):
            continue
        prev = a
        for v, k, args in ops:
            chains[v] = (value_of[v], k, args, prev)
            prev = v
        # every transform of a chain value (of u, for a direct pair) that undoes m1 takes its blocked value
        for v in names or [u]:
            for x in users.get(v, []):
                if x is not None and undone(x, a, u, m1):
                    cancelled[x] = v if names else a
    return chains, cancelled


def cancel_layout_pairs(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with its layout round trips dropped (see the module docstring); ``mod`` when it has none."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from hago.relax_rewrite import rewrite_relax_functions

    chains, cancelled, touched = {}, {}, []
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and not (func.attrs is not None and int(func.attrs.get("Primitive", 0))):
            c, x = _plans(func)
            chains.update(c)
            cancelled.update(x)
            touched += [gv] if x else []
    if not cancelled:
        return mod

    @mutator
    class Rewrite(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.blocked = {}  # chain var -> its value in the blocked layout

        def visit_var_binding_(self, binding):
            var = binding.var
            if var in chains:
                call, k, args, prev = chains[var]
                args = list(args)
                args[k] = self.blocked[prev] if prev in self.blocked else self.visit_expr(prev)
                self.blocked[var] = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
                return
            if var in cancelled:
                src = cancelled[var]
                self.set_var_remap(var, self.blocked[src] if src in self.blocked else self.visit_expr(src))
                return
            super().visit_var_binding_(binding)

    out = rewrite_relax_functions(mod, Rewrite(mod))
    for gv in touched:  # the transforms (and plain chains) nothing reads any more
        out.update_func(gv, relax.analysis.remove_all_unused(out[gv]))
    return out
