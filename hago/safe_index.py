"""safe_index: no index a model computes at run time can read or write out of bounds.

TVM's importers emit data-dependent indexing without bounds checks:
``take`` (ONNX Gather, ``nn.Embedding``, ``index_select``) defaults to
``mode="fast"``, whose kernel reads ``table[i]`` unchecked, and TOPI's
``gather``, ``gather_nd``, ``scatter_elements``, ``scatter_nd``,
``index_put`` and ``index_tensor`` kernels index memory with whatever the
index tensor holds. A token id of 30522 for a 30522-row embedding, or 2**40,
segfaulted the built MiniLM. :func:`safe_index`, run by
:func:`hago.prepare.prepare` (so by every route into hago, before any other
stage sees the graph), rewrites each of these ops to follow ONNX semantics:

* a negative index ``-n <= i < 0`` counts from the end: it wraps **once**
  to ``i + n`` (ONNX Gather/GatherElements/GatherND/ScatterElements/ScatterND);
* an index still outside ``[0, n)`` after that wrap is **clamped** to
  ``[0, n - 1]``: ``take`` gets ``mode="clip"``, the other ops get their
  indices through ``minimum(maximum(i, 0), n - 1)``. The clamp happens in the
  index dtype, so an int64 id of 2**40 becomes ``n - 1``: it never wraps
  round into another valid row. Where an integer cast narrows the index on
  its way to the op (TVM's torch importer casts ``nn.Embedding`` ids to
  int32, so 2**40 would truncate to the valid row 0), the wrap and the clamp
  move before that cast, into the wide dtype.

Valid indices give bit-identical results (the rewrite only selects rows).
The ONNX importer already wraps negatives with ``where(i < 0, i + n, i)``;
an index computed that way is recognised and not wrapped a second time
(which would turn ``-2n <= i < -n``, out of range for ONNX, into a valid
row). Indices this pass bounded are recognised the same way, so running it
twice changes nothing.

**Documented choice: clamp, not raise.** ONNX Runtime raises on an
out-of-range index. In TVM 0.27 Relax a run-time error is not cheap enough:

* ``relax.op.assert_op`` is impure, so it cannot sit inside the dataflow
  block every later hago stage (graph analysis, observe, realize, FuseOps)
  assumes, and its packed function ``relax.assert_op`` lives in
  ``libtvm_compiler.so``, not ``libtvm_runtime.so``: a ``model.so`` deployed
  with the runtime alone (the Raspberry Pi route) could not run it;
* a check PrimFunc with a TIR ``assert`` (``call_tir`` inside the dataflow
  block) does raise a clean ``RuntimeError`` on CPU, but CUDA codegen puts
  the host error call and ``return -1`` inside a ``void __global__`` kernel,
  which is not valid CUDA; it is also an opaque kernel that stops the index
  producer fusing, and a PrimFunc in the module that every module hago
  rebuilds from ``main`` would have to carry.

Clamping is pure Relax: ``less``/``add``/``where``/``minimum``/``maximum``
on the index tensor fuse into one small element-wise kernel (over the ids,
not the table), and ``mode="clip"`` is a min/max in the gather's address
computation. It keeps the single dataflow block and behaves the same on
every device. An out-of-range id therefore returns
the first or last row's result instead of failing; validate ids before
calling the model where that matters.

Also checked and left alone: ``take(..., mode="wrap")`` (a floor-mod, always
in range; the importers use it on shape tensors), ``one_hot`` (a comparison,
reads no memory at the index), ``strided_slice`` and
``dynamic_strided_slice`` (begin/end canonicalised like numpy slicing, even
for 2**40). Indices that are constants are checked here: in-range constants
(after the one wrap) are left as they are.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .errors import FrontendError
from .relax_rewrite import rewrite_relax_functions

__all__ = ["safe_index", "SAFE_OPS"]

log = logging.getLogger(__name__)

#: The ops this pass bounds; any other op reading memory at a run-time index would need adding here.
SAFE_OPS = ("relax.take", "relax.gather_elements", "relax.gather_nd", "relax.scatter_elements",
            "relax.scatter_nd", "relax.index_put", "relax.index_tensor")


def safe_index() -> tvm.transform.Pass:
    """Wrap negative indices once and clamp the rest into range, for every op of :data:`SAFE_OPS`."""
    return _SafeIndex()


@tvm.transform.module_pass(opt_level=0, name="hago.SafeIndex")
class _SafeIndex:
    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(mod, _SafeIndexMutator(mod))


def _op_name(call: relax.Call) -> str:
    return call.op.name if isinstance(call.op, tvm.ir.Op) else ""


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.Constant)


def _int_dtype(expr) -> str | None:
    """The dtype of an integer tensor ``expr``, or None (not a tensor, not an integer)."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType):
        return None
    dtype = str(ty.dtype)
    return dtype if dtype.startswith(("int", "uint")) else None


def _dims(expr) -> list | None:
    """The shape of tensor ``expr`` as ints (static) or PrimExprs (symbolic); None if the rank is unknown."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return [int(d) if isinstance(d, tirx.IntImm) else d for d in ty.shape.values]


@mutator
class _SafeIndexMutator(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = _op_name(call)
        if op not in SAFE_OPS:
            return call
        a = call.args
        if op == "relax.take":
            return self._take(call)
        if op == "relax.gather_elements":
            return self._along(call, 1, int(call.attrs.axis), lambda i: relax.op.gather_elements(
                a[0], i, int(call.attrs.axis)))
        if op == "relax.scatter_elements":
            return self._along(call, 1, int(call.attrs.axis), lambda i: relax.op.scatter_elements(
                a[0], i, a[2], int(call.attrs.axis), str(call.attrs.reduction)))
        if op == "relax.gather_nd":
            return self._coords(call, int(call.attrs.batch_dims), lambda i: relax.op.gather_nd(
                a[0], i, int(call.attrs.batch_dims)))
        if op == "relax.scatter_nd":
            return self._coords(call, 0, lambda i: relax.op.scatter_nd(a[0], i, a[2], str(call.attrs.reduction)))
        if op == "relax.index_put":
            return self._per_axis(call, lambda t: relax.op.index_put(a[0], t, a[2], bool(call.attrs.accumulate)))
        return self._per_axis(call, lambda t: relax.op.index_tensor(a[0], t))  # relax.index_tensor

    # ---- the ops -----------------------------------------------------------------------------
    def _take(self, call: relax.Call) -> relax.Expr:
        data, idx = call.args
        mode = str(call.attrs.mode)
        dims = _dims(data)
        if mode == "wrap" or _int_dtype(idx) is None or dims is None:
            return self._unchanged(call, safe=mode == "wrap")
        axis = 0 if call.attrs.axis is None else int(call.attrs.axis) % len(dims)
        fixed = self._static(idx, [dims[axis]], call)
        if fixed is idx:  # constants already in range: any mode reads in bounds
            return call
        # mode="clip" does the clamp, so only the wrap is needed here (both, where a cast narrows)
        idx = fixed if fixed is not None else self._scalar_bound(idx, data, axis, clamp=False)
        if mode == "clip" and idx.same_as(call.args[1]):
            return call
        return relax.op.take(data, idx, None if call.attrs.axis is None else axis, mode="clip")

    def _along(self, call: relax.Call, pos: int, axis: int, rebuild) -> relax.Expr:
        """gather_elements / scatter_elements: ``indices`` index ``data``'s ``axis``."""
        data, idx = call.args[0], call.args[pos]
        dims = _dims(data)
        if _int_dtype(idx) is None or dims is None:
            return self._unchanged(call)
        safe = self._bound(idx, data, [axis % len(dims)], call)
        return call if safe.same_as(idx) else rebuild(safe)

    def _coords(self, call: relax.Call, batch_dims: int, rebuild) -> relax.Expr:
        """gather_nd / scatter_nd: ``indices[..., k]`` indexes ``data``'s axis ``batch_dims + k``."""
        data, idx = call.args[0], call.args[1]
        dims, idims = _dims(data), _dims(idx)
        if _int_dtype(idx) is None or dims is None or not idims or not isinstance(idims[-1], int):
            return self._unchanged(call)
        safe = self._bound(idx, data, list(range(batch_dims, batch_dims + idims[-1])), call)
        return call if safe.same_as(idx) else rebuild(safe)

    def _per_axis(self, call: relax.Call, rebuild) -> relax.Expr:
        """index_put / index_tensor: the k-th tensor of the ``indices`` tuple indexes axis k."""
        data, tup = call.args[0], call.args[1]
        if _dims(data) is None or not isinstance(tup.ty, relax.TupleType):
            return self._unchanged(call)
        fields = list(tup.fields) if isinstance(tup, relax.Tuple) else [
            self.builder_.emit(relax.TupleGetItem(tup, k)) for k in range(len(tup.ty.fields))]
        if any(_int_dtype(f) is None for f in fields):
            return self._unchanged(call)
        safe = [self._bound(f, data, [k], call) for k, f in enumerate(fields)]
        if isinstance(tup, relax.Tuple) and all(s.same_as(f) for s, f in zip(safe, fields)):
            return call
        return rebuild(relax.Tuple(safe))

    # ---- building blocks -------------------------------------------------------------------------
    def _bound(self, idx: relax.Expr, data: relax.Expr, axes: list[int], call) -> relax.Expr:
        """``idx`` wrapped once and clamped into ``data``'s ``axes`` (several: along ``idx``'s last axis)."""
        dims = _dims(data)
        fixed = self._static(idx, [dims[a] for a in axes], call)
        if fixed is not None:
            return fixed
        if len(axes) == 1:
            return self._scalar_bound(idx, data, axes[0], clamp=True)
        if self._clamped(idx):
            return idx
        ext = self._extent(data, axes, _int_dtype(idx))
        return self._clamp(idx if self._wrapped(idx, ext) else self._wrap(idx, ext), ext)

    def _scalar_bound(self, idx: relax.Expr, data: relax.Expr, axis: int, clamp: bool) -> relax.Expr:
        """``idx`` against the one extent ``data.shape[axis]``: wrapped once, and clamped if ``clamp``.

        Where the index was narrowed by a cast on its way here (the torch importer casts
        embedding ids to int32), the wrap and the clamp happen before that cast, in the wide
        dtype, and the cast and any reshapes after it are replayed: an int64 id of 2**40 must
        not truncate to the valid row 0.
        """
        ext = self._extent(data, [axis], _int_dtype(idx))
        wrapped = self._wrapped(idx, ext)
        src, replay = self._narrowing(self._value(idx).args[2] if wrapped else idx)
        if src is not None:
            if self._clamped(src):
                return idx
            wide = self._extent(data, [axis], _int_dtype(src))
            return replay(self._clamp(self._wrap(src, wide), wide))
        if clamp and self._clamped(idx):
            return idx
        if not wrapped:
            idx = self._wrap(idx, ext)
        return self._clamp(idx, ext) if clamp else idx

    def _narrowing(self, idx: relax.Expr):
        """``(source, replay)`` when ``idx`` is a narrowing integer cast of ``source`` followed only by
        shape-only ops, with ``replay(x)`` redoing those ops on ``x``; ``(None, None)`` otherwise."""
        chain, cur, cut = [], idx, 0
        while True:
            val = self._value(cur)
            if not isinstance(val, relax.Call) or not val.args:
                break
            op = _op_name(val)
            if op == "relax.astype":
                src_dtype, dst_dtype = _int_dtype(val.args[0]), _int_dtype(val)
                if src_dtype is None or dst_dtype is None:
                    break
                chain.append(val)
                wide, narrow = np.iinfo(src_dtype), np.iinfo(dst_dtype)
                if wide.max > narrow.max or wide.min < narrow.min:
                    cut = len(chain)
            elif op in _SHAPE_ONLY:
                chain.append(val)
            else:
                break
            cur = val.args[0]
        if not cut:
            return None, None
        ops = chain[:cut][::-1]  # source side first

        def replay(x: relax.Expr) -> relax.Expr:
            for c in ops:
                x = self.builder_.emit(relax.Call(c.op, [x, *c.args[1:]], c.attrs))
            return x

        return ops[0].args[0], replay

    def _clamp(self, idx: relax.Expr, ext: relax.Expr) -> relax.Expr:
        """``minimum(maximum(idx, 0), ext - 1)`` in ``idx``'s dtype."""
        dtype = _int_dtype(idx)
        if _is_const(ext):
            last = relax.const(ext.value.numpy() - 1, dtype)
        else:
            last = self.builder_.emit(relax.op.subtract(ext, relax.const(1, dtype)))
        lo = self.builder_.emit(relax.op.maximum(idx, relax.const(0, dtype)))
        return self.builder_.emit(relax.op.minimum(lo, last))

    def _wrap(self, idx: relax.Expr, ext: relax.Expr) -> relax.Expr:
        """``where(idx < 0, idx + ext, idx)``, the importer's own form; unsigned indices need none."""
        dtype = _int_dtype(idx)
        if dtype.startswith("uint"):
            return idx
        neg = self.builder_.emit(relax.op.less(idx, relax.const(0, dtype)))
        shifted = self.builder_.emit(relax.op.add(idx, ext))
        return self.builder_.emit(relax.op.where(neg, shifted, idx))

    def _extent(self, data: relax.Expr, axes: list[int], dtype: str) -> relax.Expr:
        """``data.shape[axes]`` in ``dtype``: a constant when static, else read at run time.

        One axis gives a scalar, several a 1-D tensor (it broadcasts along the index's last axis).
        """
        dims = _dims(data)
        picked = [dims[a] for a in axes]
        if all(isinstance(d, int) for d in picked):
            _check_extents(picked, dims, dtype)
            return relax.const(np.array(picked[0] if len(axes) == 1 else picked, dtype=dtype), dtype)
        shape = self.builder_.emit(relax.op.shape_to_tensor(relax.op.shape_of(data)))
        if len(axes) == 1:
            ext = self.builder_.emit(relax.op.take(shape, relax.const(axes[0], "int64"), axis=0, mode="wrap"))
        else:
            ext = self.builder_.emit(relax.op.strided_slice(shape, axes=[0], begin=[axes[0]], end=[axes[-1] + 1]))
        return ext if dtype == "int64" else self.builder_.emit(relax.op.astype(ext, dtype))

    def _wrapped(self, idx: relax.Expr, ext: relax.Expr | None = None) -> bool:
        """Whether ``idx`` is ``where(less(i, 0), add(i, ext), i)``: negatives already wrapped once.

        The added extent is compared with ``ext`` where both are constants (a graph adding
        something else is not the ONNX wrap); a run-time extent is taken on trust.
        """
        val = self._value(idx)
        if not (isinstance(val, relax.Call) and _op_name(val) == "relax.where"):
            return False
        cond, then = self._value(val.args[0]), self._value(val.args[1])
        if not (isinstance(cond, relax.Call) and _op_name(cond) == "relax.less"
                and isinstance(then, relax.Call) and _op_name(then) == "relax.add"):
            return False
        i, zero = cond.args
        if not (_is_const(zero) and not zero.value.numpy().any() and i.same_as(val.args[2])
                and then.args[0].same_as(i)):
            return False
        added = then.args[1]
        if ext is None or not (_is_const(ext) and _is_const(added)):
            return True
        a, b = added.value.numpy(), ext.value.numpy()
        try:
            return bool(np.all(np.broadcast_to(a, np.broadcast_shapes(a.shape, b.shape)) == b))
        except ValueError:
            return False

    def _clamped(self, idx: relax.Expr) -> bool:
        """Whether ``idx`` is ``minimum(maximum(wrapped, 0), _)``: this pass bounded it already."""
        val = self._value(idx)
        if not (isinstance(val, relax.Call) and _op_name(val) == "relax.minimum"):
            return False
        lo = self._value(val.args[0])
        return (isinstance(lo, relax.Call) and _op_name(lo) == "relax.maximum" and _is_const(lo.args[1])
                and not lo.args[1].value.numpy().any()
                and (self._wrapped(lo.args[0]) or _int_dtype(lo.args[0]).startswith("uint")))

    def _value(self, expr: relax.Expr) -> relax.Expr:
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is not None:
                return bound
        return expr

    def _static(self, idx: relax.Expr, extents: list, call) -> relax.Expr | None:
        """A constant index against static extents, wrapped and clamped now (``idx`` itself if in range).

        None when the index is not a constant or an extent is symbolic: it is bounded at run time.
        """
        if not _is_const(idx) or not all(isinstance(n, int) for n in extents):
            return None
        value = idx.value.numpy()
        dtype = str(value.dtype)
        _check_extents(extents, extents, dtype)
        n = np.array(extents if len(extents) > 1 else extents[0], dtype=np.int64)
        wide = value.astype(np.int64)
        fixed = np.clip(np.where(wide < 0, wide + n, wide), 0, n - 1)
        if np.array_equal(fixed, wide):
            return idx
        log.warning("%s: constant index out of range, clamped (hago.safe_index)", _op_name(call))
        return relax.const(fixed.astype(dtype), dtype)

    def _unchanged(self, call: relax.Call, safe: bool = False) -> relax.Call:
        if not safe:
            log.warning("%s left unbounded: its indices or shapes are not static tensors (hago.safe_index)",
                        _op_name(call))
        return call


_SHAPE_ONLY = {"relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze", "relax.flatten"}


def _check_extents(extents: list[int], shape: list, dtype: str) -> None:
    """An empty axis has no valid index, and every extent must fit the index dtype for the wrap to be exact."""
    if 0 in extents:
        raise FrontendError(f"the model indexes an empty axis (shape {shape}); no index is valid there")
    if max(extents) > np.iinfo(dtype).max:
        raise FrontendError(f"an axis of {max(extents)} cannot be indexed with {dtype}; export the indices as int64")
