"""Run 1-D convolutions and pools as 2-D ones with a unit height.

Every integer path of hago (annotate's kinds, realize, the VNNI / depthwise /
ARM kernels, simulate, the corrections) speaks ``conv2d``. Rather than
teaching each of them a second layout, :func:`conv1d_as_conv2d` rewrites,
at prepare time,

* ``conv1d(x, W)`` (NCW / OIW) into
  ``squeeze(conv2d(expand_dims(x, 2), W[:, :, None, :]), 2)`` with strides,
  padding and dilation moved to the width axis;
* ``max_pool1d`` / ``avg_pool1d`` (NCW) into the 2-D pool the same way;

and then sinks each ``squeeze`` below the ops that do not care about the
unit axis (element-wise ops, per-channel constants, ``mean`` over the
width), and cancels ``expand_dims(squeeze(y, 2), 2)`` into ``y``. A batch norm
over the channels is sunk too, so ``prepare.fold_batch_norm`` folds it into
the conv as it does for 2-D nets. A stack
of Conv1d / bias / ReLU / MaxPool1d layers thus becomes the same conv2d
chain a 2-D net has, with one ``expand_dims`` at its input and one
``squeeze`` where the 1-D shape is needed again: the bias is fused into its
conv and every layer takes the integer path.

The rewrites are exact (the same arithmetic on the same values).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_rewrite import rewrite_relax_functions

__all__ = ["conv1d_as_conv2d"]

#: element-wise ops with one tensor operand first: op(squeeze(y)) == squeeze(op(y))
_UNARY = {
    "relax.nn.relu", "relax.clip", "relax.sigmoid", "relax.tanh", "relax.nn.gelu", "relax.nn.gelu_tanh",
    "relax.nn.silu", "relax.nn.leakyrelu", "relax.exp", "relax.erf", "relax.abs", "relax.negative",
    "relax.sqrt", "relax.astype", "relax.round", "relax.floor", "relax.ceil",
}
#: binary element-wise ops: sunk when every operand is a squeezed tensor or a constant
_BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
           "relax.power"}
_AXIS = 2  # the unit height inserted into NCW


def conv1d_as_conv2d() -> tvm.transform.Pass:
    """Rewrite NCW conv1d / max_pool1d / avg_pool1d as NCHW 2-D ops of unit height (see module doc)."""
    return _Conv1dAs2d()


@tvm.transform.module_pass(opt_level=0, name="hago.Conv1dAsConv2d")
class _Conv1dAs2d:
    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(mod, _As2d(mod))


def _static_shape(expr) -> list | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return list(ty.shape.values)


def _op(call) -> str:
    return call.op.name if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) else ""


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _const_4d(c: tvm.ir.expr.Constant) -> relax.Constant:
    """A constant broadcast against NCW, reshaped to broadcast the same way against NC1W."""
    v = c.value.numpy()
    if v.ndim == 3:
        v = v.reshape(v.shape[0], v.shape[1], 1, v.shape[2])
    elif v.ndim == 2:
        v = v.reshape(v.shape[0], 1, v.shape[1])
    return relax.const(v, str(v.dtype))


@mutator
class _As2d(PyExprMutator):
    def unsqueezed(self, expr) -> relax.Expr | None:
        """``y`` when ``expr`` is bound to ``squeeze(y, [2])`` of a 4-D ``y`` with unit height, else None."""
        value = self.bound(expr)
        if _op(value) != "relax.squeeze" or value.attrs.axis is None:
            return None
        y = value.args[0]
        shape = _static_shape(y)
        if shape is None or len(shape) != 4:
            return None
        axes = [int(a) % 4 for a in value.attrs.axis]
        one = shape[_AXIS]
        if axes != [_AXIS] or not (isinstance(one, tvm.tirx.IntImm) and int(one) == 1):
            return None
        return y

    def bound(self, expr) -> relax.Expr | None:
        """The value ``expr`` is bound to, looking through ``(a, b, c)[i]`` of a known tuple."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if isinstance(value, relax.TupleGetItem):
            tup = self.lookup_binding(value.tuple_value) if isinstance(value.tuple_value, relax.Var) else None
            if isinstance(tup, relax.Tuple):
                field = tup.fields[int(value.index)]
                return self.bound(field) if isinstance(field, relax.Var) else field
        return value

    def expanded(self, x) -> relax.Expr:
        """``x`` (NCW) as NC1W, reusing the 4-D value it was squeezed from."""
        y = self.unsqueezed(x)
        return y if y is not None else relax.op.expand_dims(x, _AXIS)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = _op(call)
        if op == "relax.nn.conv1d":
            return self.conv1d(call)
        if op in ("relax.nn.max_pool1d", "relax.nn.avg_pool1d"):
            return self.pool1d(call)
        return self.sink(call, op)

    def conv1d(self, call: relax.Call) -> relax.Expr:
        a = call.attrs
        w = call.args[1]
        if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCW", "OIW", "NCW"):
            return call
        if isinstance(w, tvm.ir.expr.Constant):
            wv = w.value.numpy()
            w4 = relax.const(wv.reshape(wv.shape[0], wv.shape[1], 1, wv.shape[2]), str(wv.dtype))
        else:
            w4 = relax.op.expand_dims(w, _AXIS)
        left, right = _ints(a.padding)
        conv = relax.op.nn.conv2d(self.expanded(call.args[0]), w4, strides=(1, int(a.strides[0])),
                                  padding=(0, left, 0, right), dilation=(1, int(a.dilation[0])),
                                  groups=int(a.groups), out_dtype=a.out_dtype)
        return relax.op.squeeze(conv, [_AXIS])

    def pool1d(self, call: relax.Call) -> relax.Expr:
        a = call.attrs
        if (a.layout, a.out_layout) != ("NCW", "NCW"):
            return call
        pool = relax.op.nn.max_pool2d if _op(call) == "relax.nn.max_pool1d" else relax.op.nn.avg_pool2d
        left, right = _ints(a.padding)
        y = pool(self.expanded(call.args[0]), pool_size=(1, int(a.pool_size[0])), strides=(1, int(a.strides[0])),
                 padding=(0, left, 0, right), dilation=(1, int(a.dilation[0])), ceil_mode=bool(a.ceil_mode),
                 count_include_pad=bool(a.count_include_pad))
        return relax.op.squeeze(y, [_AXIS])

    def sink(self, call: relax.Call, op: str) -> relax.Expr:
        """``op(squeeze(y), ...)`` -> ``squeeze(op(y, ...))`` where the unit axis does not matter."""
        if not call.args:
            return call
        if op == "relax.expand_dims":
            y = self.unsqueezed(call.args[0])
            axes = [int(v) for v in call.attrs.axis]
            return y if y is not None and axes in ([_AXIS], [-2]) else call
        if op in _UNARY or (op == "relax.nn.prelu" and int(call.attrs.axis) == 1):
            y = self.unsqueezed(call.args[0])
            if y is None:
                return call
            return relax.op.squeeze(relax.Call(call.op, [y, *call.args[1:]], call.attrs, call.ty_args), [_AXIS])
        if op in _BINARY and len(call.args) == 2:
            ys = [self.unsqueezed(a) for a in call.args]
            if all(y is None for y in ys):
                return call
            args = []
            for a, y in zip(call.args, ys):
                if y is not None:
                    args.append(y)
                elif isinstance(a, tvm.ir.expr.Constant):
                    args.append(_const_4d(a))
                else:
                    return call
            return relax.op.squeeze(relax.Call(call.op, args, call.attrs, call.ty_args), [_AXIS])
        if op == "relax.nn.batch_norm" and int(call.attrs.axis) == 1:
            y = self.unsqueezed(call.args[0])
            if y is None:
                return call
            bn = self.builder_.emit(relax.Call(call.op, [y, *call.args[1:]], call.attrs, call.ty_args))
            return relax.Tuple([relax.op.squeeze(relax.TupleGetItem(bn, 0), [_AXIS]),
                                relax.TupleGetItem(bn, 1), relax.TupleGetItem(bn, 2)])
        if op == "relax.mean" and bool(call.attrs.keepdims) and call.attrs.axis is not None:
            y = self.unsqueezed(call.args[0])
            if y is None:
                return call
            axes = [int(v) % 3 for v in call.attrs.axis]
            axes4 = [v + 1 if v >= _AXIS else v for v in axes]
            return relax.op.squeeze(relax.op.mean(y, axes4, keepdims=True), [_AXIS])
        if op == "relax.reshape":
            y = self.unsqueezed(call.args[0])
            return call if y is None else relax.op.reshape(y, call.args[1])
        return call
