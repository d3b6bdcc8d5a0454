"""Put a bf16 conv's bias, relu/relu6 and bf16 cast into the conv kernel's write-back instead of a pass of their own.

After the float layout pass (:mod:`.float_layout`) a bf16 layer reads, in
blocked layouts::

    y = conv2d(x_bf16, w)            # fp32 NCHW{ob}c: a backend's opaque kernel
    y = add(y, bias)                 # per-channel constant
    y = add(y, r)                    # a residual: fp32, the conv's blocked shape (a backend that takes it)
    y = minimum(maximum(y, 0), 6)    # relu6 (or relu, maximum alone, or clip)
    y = astype(y, "bfloat16")        # when the next layer is bf16 too

When the chain's fp32 value has one more user, besides its own cast to bf16
(an inverted-residual block's input: the expand conv reads it in bf16, the
residual add later in fp32), a backend whose kernel writes two outputs
(``two_outputs``) writes both from the same write-back: the cast's pass goes.
Several casts of the value share that bf16 output.

FuseOps cannot fuse into an opaque kernel, so everything after the conv is
one more pass over its fp32 output (read 4 bytes, write 2 or 4 per value).
This rewrite, run before legalization, replaces such a chain by one kernel
call whose write-back adds the bias, clamps and casts. Which kernel takes a
conv is the backend's: ``find(call)`` returns None or an object with ``x``
(the conv's data), ``o``, ``ob`` (output channels and their block) and
``emit(bb, x, bias=, clip=, out_dtype=[, residual=])`` (AMX:
``amx.conv.amx_bf16_conv``; AVX-512 BF16: ``x86.bf16_blocked.x86_bf16_conv``,
which takes the residual too).

A value in the chain with another user, or that leaves the dataflow block,
ends the chain there; the bindings left unused are removed. The numbers are
those of the unfused program: the same fp32 sums, the same ``max``/``min``,
the same round-to-nearest-even cast.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax

BF16 = "bfloat16"


def _op(expr) -> str:
    return getattr(getattr(expr, "op", None), "name", "") if isinstance(expr, relax.Call) else ""


def _scalar(expr) -> float | None:
    if isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(-1)[0])
    return None


def _channel_bias(expr, o: int, ob: int) -> np.ndarray | None:
    """``[O]`` fp32 bias of a blocked per-channel constant ``[1, O/ob, 1, 1, ob]``, else None."""
    if not isinstance(expr, tvm.ir.expr.Constant) or str(expr.value.dtype) != "float32":
        return None
    v = expr.value.numpy()
    if v.shape != (1, o // ob, 1, 1, ob):
        return None
    return v.reshape(o)


def bound_value(bb: relax.BlockBuilder, x: relax.Expr):
    """The value ``x`` is bound to in ``bb`` (None for a parameter or a var bound elsewhere)."""
    try:
        return bb.lookup_binding(x) if isinstance(x, relax.Var) else None
    except Exception:  # not bound in this builder
        return None


def fp32_source(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
    """``x``'s fp32 input when ``x`` is bound to ``astype(fp32 blocked value, bf16)``, else ``x``: a kernel whose
    packing pass rounds to bf16 anyway reads the fp32 value and the cast's own pass goes."""
    value = bound_value(bb, x)
    if (isinstance(value, relax.Call) and _op(value) == "relax.astype"
            and str(value.args[0].ty.dtype) == "float32" and len(value.args[0].ty.shape) == 5):
        return value.args[0]
    return x


class Chains:
    """Per dataflow var: its binding value and how many times it is used (to fuse single-use chains only).

    ``find``: the backend's kernel for a bf16 conv call (see the module
    docstring). ``bias_alone``: fuse a chain that is only the bias add too
    (a kernel that adds the bias on its registers saves that pass as well).
    ``residual``: the kernel's ``emit`` takes ``residual=``, a tensor added
    after the bias and before the clamp (a ResNet or inverted-residual block's
    skip connection). ``two_outputs``: the kernel's ``emit`` takes ``out_dtype=("float32", "bfloat16")`` and
    returns both (see the module docstring).
    """

    def __init__(self, func: relax.Function, find: Callable, bias_alone: bool = False, residual: bool = False,
                 two_outputs: bool = False):
        self.find, self.bias_alone, self.residual, self.two_outputs = find, bias_alone, residual, two_outputs
        self.value: dict = {}
        self.uses: dict = {}
        if isinstance(func.body, relax.SeqExpr):
            for block in func.body.blocks:
                for binding in block.bindings:
                    if isinstance(binding, relax.VarBinding):
                        self.value[binding.var] = binding.value

        def visit(expr):  # every occurrence of a var in an expression is a use (definitions are not visited)
            if isinstance(expr, relax.Var):
                self.uses[expr] = self.uses.get(expr, 0) + 1

        relax.analysis.post_order_visit(func, visit)

    def single_use(self, var) -> bool:
        return isinstance(var, relax.DataflowVar) and self.uses.get(var, 0) == 1

    def _skip(self, step, end, conv_var):
        """The other operand of ``add(end, r)`` / ``add(r, end)`` when ``r`` can be the kernel's residual: an fp32
        var of the conv's shape, not computed from the conv itself (the chain's own values have one use each)."""
        if not self.residual or len(step.args) != 2:
            return None
        a, b = step.args
        other = b if a.same_as(end) else a if b.same_as(end) else None
        if not isinstance(other, relax.Var) or other.same_as(conv_var):
            return None
        ty, want = other.ty, self.value[conv_var].ty
        try:
            same = [int(d) for d in ty.shape.values] == [int(d) for d in want.shape.values]
        except (TypeError, AttributeError):
            return None
        return other if same and str(ty.dtype) == "float32" else None

    def _bf16_casts(self, end, users: list):
        """``(cast vars, fp32 kept)`` when every use of ``end`` (fp32) but at most one is an ``astype(end, bf16)``
        (the kernel writes the cast as an output, and the fp32 value too when one other use needs it), else None.

        Two casts of one value happen (a ResNet block's input, cast once for its first conv and once for its
        downsampling conv): one bf16 output serves both."""
        if not self.two_outputs or not isinstance(end, relax.DataflowVar) or self.uses.get(end, 0) != len(users):
            return None
        casts = tuple(u for u in users if _op(self.value[u]) == "relax.astype"
                      and str(self.value[u].attrs.dtype) == BF16)
        others = len(users) - len(casts)
        return (casts, others == 1) if casts and others <= 1 and len(users) >= 2 else None

    def _chain(self, var, value, found, users: dict, skips: bool):
        """``(end var, chain)`` of the conv ``var`` = ``value`` (see :meth:`ends`), or None when nothing fuses;
        ``skips``: whether a residual add may join it."""
        end, bias, lo, hi, dtype, skip = var, None, None, None, "float32", None
        while self.single_use(end) and len(users.get(end, [])) == 1 and dtype == "float32":
            nxt = users[end][0]
            step = self.value[nxt]
            other = step.args[1] if len(step.args) > 1 else None
            name = _op(step)
            if (name == "relax.add" and bias is None and skip is None and lo is None and hi is None
                    and step.args[0].same_as(end) and _channel_bias(other, found.o, found.ob) is not None):
                bias = _channel_bias(other, found.o, found.ob)
            elif (name == "relax.add" and skips and skip is None and lo is None and hi is None
                  and self._skip(step, end, var) is not None):
                skip = self._skip(step, end, var)
            elif name == "relax.maximum" and lo is None and hi is None and _scalar(other) is not None:
                lo = _scalar(other)
            elif name == "relax.nn.relu" and lo is None and hi is None:
                lo = 0.0
            elif name == "relax.minimum" and hi is None and _scalar(other) is not None:
                hi = _scalar(other)
            elif name == "relax.clip" and lo is None and hi is None:
                lo, hi = (float(getattr(a.value, "value", a.value)) for a in step.args[1:3])
            elif name == "relax.astype" and str(step.attrs.dtype) == BF16:
                dtype = BF16
            else:
                break
            end = nxt
        casts = self._bf16_casts(end, users.get(end, [])) if dtype == "float32" else None
        if casts is None and (end is var or (lo is None and hi is None and dtype == "float32"
                                             and not self.bias_alone and skip is None)):
            return None
        clip = (-np.inf if lo is None else lo, np.inf if hi is None else hi)
        return end, (value, bias, clip, dtype, skip) + (casts or ((), True))

    def ends(self) -> dict:
        """End var of each fusable chain -> (conv call, bias or None, (lo, hi) or None, out dtype, residual var
        or None, the vars of the end's bf16 casts that the kernel writes too (may be empty), whether the fp32
        value is written too).

        Two convs whose chains meet at one residual add (a downsampling block: ``conv2(x) + b2`` plus
        ``down(x) + b3``): the first takes the add, the other's chain ends before it (each keeps its bias)."""
        users: dict = {}
        for var, value in self.value.items():
            if isinstance(value, relax.Call):
                for arg in value.args:
                    if isinstance(arg, relax.Var):
                        users.setdefault(arg, []).append(var)
        chains = {}
        for var, value in self.value.items():
            if _op(value) != "relax.nn.conv2d" or str(value.args[0].ty.dtype) != BF16:
                continue
            found = self.find(value)
            if found is None:
                continue
            chain = self._chain(var, value, found, users, skips=True)
            if chain is not None and chain[0] in chains:  # the add is taken: up to the add only
                chain = self._chain(var, value, found, users, skips=False)
            if chain is not None and chain[0] not in chains:
                chains[chain[0]] = chain[1]
        return chains


def fuse_bf16_epilogues(mod: tvm.IRModule, find: Callable, bias_alone: bool = False,
                        residual: bool = False, two_outputs: bool = False) -> tvm.IRModule:
    """``mod`` with every bf16 conv + bias (+ residual) + clamp (+ bf16 cast) chain as one kernel call (see the
    module and :class:`Chains`)."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from hago.relax_rewrite import rewrite_relax_functions

    ends: dict = {}
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            ends.update(Chains(func, find, bias_alone, residual, two_outputs).ends())
    if not ends:
        return mod
    casts = {cast: end for end, chain in ends.items() for cast in chain[5]}
    written: dict = {}  # chain end -> the kernel's bf16 output, for the casts it replaces

    @mutator
    class _Fuse(PyExprMutator):
        def visit_var_binding_(self, binding: relax.VarBinding) -> None:
            if binding.var in casts:  # the kernel wrote this cast as an output
                self.set_var_remap(binding.var, written[casts[binding.var]])
                return None
            if binding.var not in ends:
                return super().visit_var_binding_(binding)
            conv, bias, clip, dtype, skip, cast_vars, keep_fp32 = ends[binding.var]
            found = find(conv)
            extra = {} if skip is None else {"residual": self.visit_expr(skip)}
            out_dtype = dtype if not cast_vars else ("float32", BF16) if keep_fp32 else BF16
            y = found.emit(self.builder_, self.visit_expr(found.x), bias=bias, clip=clip, out_dtype=out_dtype, **extra)
            if cast_vars and keep_fp32:
                written[binding.var] = self.builder_.emit(relax.TupleGetItem(y, 1))
                y = self.builder_.emit(relax.TupleGetItem(y, 0))
            elif cast_vars:  # only the casts read it: the fp32 value is never written
                written[binding.var] = y
                return None
            self.set_var_remap(binding.var, y)

    fused = rewrite_relax_functions(mod, _Fuse(mod))
    return relax.transform.DeadCodeElimination()(fused)
