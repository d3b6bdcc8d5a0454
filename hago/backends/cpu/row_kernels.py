"""Row kernels for transformers on a CPU: softmax (with its scale and mask) and layer norm, one pass per row.

A transformer's attention scores go through ``softmax(scores * c + mask)``
over the last axis. Legalized op by op, that is a scale-and-mask kernel and
TOPI's softmax, whose four stages (row max, exp, row sum, divide) each
sweep the whole ``[heads, queries, keys]`` tensor: MiniLM at sequence 128
moved 786 KB per stage, six times per sentence, and the softmax took 12% of
its INT8 time.

:func:`fuse_row_kernels` (run before legalization) replaces each last-axis
float32 softmax, with the scale and mask that feed it when they are there,
by one kernel (:func:`softmax_func`): each parallel task takes whole rows;
a row's logits stay in a stack buffer while it is reduced (a halving tree,
not a chain of dependent max/add), exponentiated and normalized, so every
value is read once and written once. The exponential is TOPI's
``fast_exp`` polynomial (the one every other float exp in hago's CPU
builds uses, :func:`hago.lower.fast_math_legalizations`); normalizing
multiplies by the reciprocal of the row sum, as MLAS does.

Layer norm (:func:`layer_norm_func`) is TOPI's three passes (sum, squared
deviations, normalize; three thread-pool launches) done the same way.

An identity ``broadcast_to`` (``torch.export``'s ``expand`` to the shape
the tensor already has) is dropped on the way: it would otherwise be a
full copy of the probabilities.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from hago import tvmscript  # noqa: F401  (T.macro calls without reading source files)
from hago.tvm_consts import IS_SCHEDULED, OPAQUE

from .tir_kernel import as_call_tir_kernel

#: the largest row the kernel takes: its two row buffers stay within hago's stack allocations (16 KiB)
MAX_ROW = 2048

# TOPI's fast_exp for float32 (topi/elemwise.h): Cephes' polynomial after a 2^n range reduction
_EXP_HI, _EXP_LO = 88.3762626647950, -88.3762626647949
_LOG2E, _LN2 = 1.44269504088896341, 0.6931471805599453
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def fast_exp(v):
    """``exp(v)`` for a float32 PrimExpr, TOPI's ``fast_exp_float32`` operation for operation."""
    f32 = lambda c: T.float32(c)  # noqa: E731
    x = T.max(T.min(v, f32(_EXP_HI)), f32(_EXP_LO))
    n = T.floor(x * f32(_LOG2E) + f32(0.5))
    f = x - n * f32(_LN2)
    y = f32(_EXP_P[0])
    for p in _EXP_P[1:]:
        y = y * f + f32(p)
    y = y * f * f + f + f32(1.0)
    two_n = T.reinterpret("float32", T.shift_left(T.Cast("int32", n + f32(127.0)), T.int32(23)))
    return T.max(two_n * y, v)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def row_folder(n: int, lanes: int):
    """``(fold, slots)``: ``fold(get, red, op)`` leaves in ``red[0]`` the ``op``-reduction of ``get(j)``
    for ``j < n``; ``red`` is a local buffer of ``slots`` floats.

    A power-of-two row is halved from ``n`` down, vector against vector (a
    tree of depth log2(n), not a chain of n dependent operations). Another
    row is first folded into ``lanes`` partial results (when ``lanes``
    divides it), then halved.
    """
    head = n // 2 if _pow2(n) else (lanes if n % lanes == 0 and _pow2(lanes) else 1)
    chunks = n // head if not _pow2(n) else 2
    hs = [head >> i for i in range(1, 11)]  # head/2 ... 1, then zeros: levels that do not exist
    if head >= 1 << 11:
        raise ValueError(f"row reduction: {n} values exceed the tree's {1 << 12}")

    @T.macro
    def halve(red, op, h):
        if h > 0:
            for j in T.vectorized(h):
                red[j] = op(red[j], red[j + h])

    @T.macro
    def fold(get, red, op):
        for j in T.vectorized(head):
            red[j] = op(get(j), get(head + j))
        for t in T.serial(2, chunks):
            for j in T.vectorized(head):
                red[j] = op(red[j], get(t * head + j))
        halve(red, op, hs[0])  # the tree, as many levels as head has (TVMScript takes no Python loop here)
        halve(red, op, hs[1])
        halve(red, op, hs[2])
        halve(red, op, hs[3])
        halve(red, op, hs[4])
        halve(red, op, hs[5])
        halve(red, op, hs[6])
        halve(red, op, hs[7])
        halve(red, op, hs[8])
        halve(red, op, hs[9])

    return fold, max(head, 1)


def _add(a, b):
    return a + b


@functools.lru_cache(maxsize=256)  # parsing the TVMScript costs ~0.5 s; a BERT repeats one shape per layer
def softmax_func(rows: int, n: int, lanes: int, scale: float | None = None, mask_rows: int | None = None):
    """``softmax(x * scale + mask)`` over the last axis of ``x [rows, n]``; ``mask [mask_rows, n]`` (row
    ``r`` reads mask row ``r // (rows // mask_rows)``: a per-batch key mask broadcast over heads and queries).

    Arguments ``(x, [mask,] out)``. ``lanes`` only decides the width of the
    pre-fold when ``n`` is not a power of two; the row loops are vectorized
    over the whole row (LLVM splits them into registers).
    """
    if n > MAX_ROW:
        raise ValueError(f"softmax: rows of {n} exceed the kernel's {MAX_ROW}")
    attrs = {"tir.noalias": True, IS_SCHEDULED: True, "op_pattern": OPAQUE}
    per = rows // mask_rows if mask_rows else 1
    fold, slots = row_folder(n, lanes)
    c = T.float32(1.0 if scale is None else scale)

    def logit(x, mask, r, j):
        v = x[r, j] if scale is None else x[r, j] * c
        return v if mask is None else v + mask[r // per, j]

    @T.macro
    def body(x, mask, out):
        for r in T.parallel(rows):
            buf = T.decl_buffer((n,), "float32", scope="local")
            red = T.decl_buffer((slots,), "float32", scope="local")
            for j in T.vectorized(n):
                buf[j] = logit(x, mask, r, j)
            fold(lambda j: buf[j], red, T.max)
            for j in T.vectorized(n):
                buf[j] = fast_exp(buf[j] - red[0])
            fold(lambda j: buf[j], red, _add)
            red[0] = T.float32(1.0) / red[0]
            for j in T.vectorized(n):
                out[r, j] = buf[j] * red[0]

    if mask_rows:
        @T.prim_func
        def kernel(x: T.Buffer((rows, n), "float32"), mask: T.Buffer((mask_rows, n), "float32"),
                   out: T.Buffer((rows, n), "float32")):
            T.func_attr(attrs)
            body(x, mask, out)
    else:
        @T.prim_func
        def kernel(x: T.Buffer((rows, n), "float32"), out: T.Buffer((rows, n), "float32")):
            T.func_attr(attrs)
            body(x, None, out)


    return as_call_tir_kernel(kernel)


@functools.lru_cache(maxsize=256)  # (as softmax_func: PrimFuncs are immutable, so one serves every build)
def layer_norm_func(rows: int, n: int, lanes: int, epsilon: float):
    """``layer_norm`` over the last axis of ``x [rows, n]`` with ``gamma [n]``, ``beta [n]``: one pass per row.

    Arguments ``(x, gamma, beta, out)``. TOPI's formula, op for op:
    ``(x - mean) * rsqrt(var + eps) * gamma + beta`` with ``mean = sum / n``
    and ``var = sum((x - mean)^2) / n`` (the sums as a tree).
    """
    if n > MAX_ROW:
        raise ValueError(f"layer_norm: rows of {n} exceed the kernel's {MAX_ROW}")
    attrs = {"tir.noalias": True, IS_SCHEDULED: True, "op_pattern": OPAQUE}
    fold, slots = row_folder(n, lanes)
    count, eps = T.float32(float(n)), T.float32(epsilon)

    @T.prim_func
    def kernel(x: T.Buffer((rows, n), "float32"), gamma: T.Buffer((n,), "float32"),
               beta: T.Buffer((n,), "float32"), out: T.Buffer((rows, n), "float32")):
        T.func_attr(attrs)
        for r in T.parallel(rows):
            buf = T.decl_buffer((n,), "float32", scope="local")
            red = T.decl_buffer((slots,), "float32", scope="local")
            for j in T.vectorized(n):
                buf[j] = x[r, j]
            fold(lambda j: buf[j], red, _add)
            red[0] = red[0] / count
            for j in T.vectorized(n):
                buf[j] = buf[j] - red[0]
            fold(lambda j: buf[j] * buf[j], red, _add)
            red[0] = T.rsqrt(red[0] / count + eps)
            for j in T.vectorized(n):
                out[r, j] = buf[j] * red[0] * gamma[j] + beta[j]


    return as_call_tir_kernel(kernel)


# ---- the Relax rewrite --------------------------------------------------------
def _op(expr) -> str:
    return getattr(getattr(expr, "op", None), "name", "") if isinstance(expr, relax.Call) else ""


def _static(expr) -> list[int] | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None or str(getattr(ty, "dtype", "")) != "float32":
        return None
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):
        return None


def _scalar(expr) -> float | None:
    if isinstance(expr, tvm.ir.expr.Constant) and str(expr.value.dtype) == "float32" \
            and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(-1)[0])
    return None


def _mask_rows(mask_shape: list[int], shape: list[int]) -> int | None:
    """Rows of a mask that broadcasts over ``shape`` as ``[B or 1, 1, ..., 1, n]`` (None: another pattern)."""
    if not mask_shape or mask_shape[-1] != shape[-1] or len(mask_shape) > len(shape):
        return None
    lead = [1] * (len(shape) - len(mask_shape)) + list(mask_shape[:-1])
    if any(d != 1 for d in lead[1:]) or lead[0] not in (1, shape[0]):
        return None
    return lead[0]


class _Uses:
    """Binding values and use counts of one Relax function (fuse only what nothing else reads)."""

    def __init__(self, func: relax.Function):
        self.value: dict = {}
        self.count: dict = {}
        for block in getattr(func.body, "blocks", []):
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    self.value[binding.var] = binding.value

        def visit(expr):
            if isinstance(expr, relax.Var):
                self.count[expr] = self.count.get(expr, 0) + 1

        relax.analysis.post_order_visit(func, visit)

    def only_use(self, var) -> relax.Expr | None:
        """The value of ``var`` when it is a dataflow var read exactly once (by the caller), else None."""
        if isinstance(var, relax.DataflowVar) and self.count.get(var, 0) == 1:
            return self.value.get(var)
        return None


def _plan(uses: _Uses, call: relax.Call):
    """``(x, scale, mask, mask_rows, shape)`` for a softmax the kernel takes, else None."""
    shape = _static(call)
    if shape is None or len(shape) < 1 or int(call.attrs.axis) not in (-1, len(shape) - 1):
        return None
    if not 2 <= shape[-1] <= MAX_ROW:
        return None
    x, scale, mask, mask_rows = call.args[0], None, None, None
    value = uses.only_use(x)
    if _op(value) == "relax.add":
        a, b = value.args
        for scores, m in ((a, b), (b, a)):
            ms = _static(m)
            if _static(scores) == shape and ms is not None and ms != shape:
                rows = _mask_rows(ms, shape)
                if rows is not None:
                    x, mask, mask_rows = scores, m, rows
                    value = uses.only_use(x)
                break
    if _op(value) == "relax.multiply":
        a, b = value.args
        for t, c in ((a, b), (b, a)):
            if _scalar(c) is not None and _static(t) == shape:
                x, scale = t, _scalar(c)
                break
    return x, scale, mask, mask_rows, shape


def _layer_norm_takes(call: relax.Call) -> bool:
    """A float32 layer norm over the last axis with gamma and beta of that axis' length."""
    shape = _static(call)
    if shape is None or len(shape) < 2 or not 2 <= shape[-1] <= MAX_ROW:
        return False
    if [int(a) for a in call.attrs.axes] not in ([-1], [len(shape) - 1]):
        return False
    if not (bool(call.attrs.center) and bool(call.attrs.scale)):
        return False
    return all(_static(a) == [shape[-1]] for a in call.args[1:3])


def fuse_row_kernels(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """``mod`` with every last-axis float32 softmax (and the scale and mask feeding it) and layer norm as
    one kernel call each."""
    from tvm.relax import op as O
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from hago.relax_rewrite import rewrite_relax_functions

    plans, identity, norms = {}, set(), set()
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        uses = _Uses(func)
        for var, value in uses.value.items():
            if not isinstance(var, relax.DataflowVar):  # a block output: its value must stay a binding of it
                continue
            if _op(value) == "relax.nn.softmax":
                found = _plan(uses, value)
                if found is not None:
                    plans[var] = found
            elif _op(value) == "relax.nn.layer_norm" and _layer_norm_takes(value):
                norms.add(var)
            elif _op(value) == "relax.broadcast_to" and _static(value.args[0]) is not None \
                    and _static(value.args[0]) == _static(value):
                identity.add(var)
    if not plans and not identity and not norms:
        return mod

    @mutator
    class _Fuse(PyExprMutator):
        def visit_var_binding_(self, binding: relax.VarBinding) -> None:
            bb = self.builder_
            if binding.var in identity:
                self.set_var_remap(binding.var, self.visit_expr(binding.value.args[0]))
                return None
            if binding.var in norms:
                call = binding.value
                shape = _static(call)
                n, rows = shape[-1], int(np.prod(shape[:-1], dtype=np.int64))
                x, gamma, beta = (self.visit_expr(a) for a in call.args)
                gv = bb.add_func(layer_norm_func(rows, n, lanes, float(call.attrs.epsilon)), "hago_layer_norm")
                out = bb.emit(relax.call_tir(gv, [bb.emit(O.reshape(x, (rows, n))), gamma, beta],
                                             relax.TensorType((rows, n), "float32")))
                self.set_var_remap(binding.var, bb.emit(O.reshape(out, shape)))
                return None
            if binding.var not in plans:
                return super().visit_var_binding_(binding)
            x, scale, mask, mask_rows, shape = plans[binding.var]
            n = shape[-1]
            rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
            args = [bb.emit(O.reshape(self.visit_expr(x), (rows, n)))]
            if mask is not None:
                args.append(bb.emit(O.reshape(self.visit_expr(mask), (mask_rows, n))))
            gv = bb.add_func(softmax_func(rows, n, lanes, scale, mask_rows), "hago_softmax")
            out = bb.emit(relax.call_tir(gv, args, relax.TensorType((rows, n), "float32")))
            self.set_var_remap(binding.var, bb.emit(O.reshape(out, shape)))
            return None

    fused = rewrite_relax_functions(mod, _Fuse(mod))
    return relax.transform.DeadCodeElimination()(fused)
