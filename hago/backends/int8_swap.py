"""The kernel swap after realize, written once: int8 ``matmul``/``conv2d`` with constant weights
become ``call_tir`` of a pre-scheduled kernel.

Realize emits plain int8 x int8 -> int32 ``matmul`` and NCHW/OIHW ``conv2d``
with constant weights. A backend whose fast instructions want the weights in
its own tile order (ARM NEON/SDOT, CUDA dp4a) swaps each eligible call for
its kernel before the device build. What every such swap shares lives here:

* the guards: an int32-accumulating call, an int8 activation with static
  inner dims (the batch may be symbolic), a constant int8 weight; dense
  ``x [m, K] @ w [K, N]``, conv2d NCHW/OIHW/NCHW with one group;
* ``visit_call_``, the count of swapped calls and the list of declined ones;
* one kernel per shape (:meth:`Int8KernelSwap.kernel`, memoized by key and
  named ``<prefix><key>``);
* the driver over every Relax function of the module (:func:`swap_kernels`).

A backend subclasses :class:`Int8KernelSwap` (decorated with ``@mutator``),
sets ``prefix`` and implements ``dense`` and ``conv2d``, each returning the
replacement or None to leave the call as it is. Integer sums are exact, so a
swapped kernel gives the naive op's result bit for bit.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator

from hago.relax_rewrite import rewrite_relax_functions


def const_int8(expr) -> np.ndarray | None:
    """The value of an int8 constant, else None."""
    if isinstance(expr, tvm.ir.expr.Constant) and str(expr.value.dtype) == "int8":
        return expr.value.numpy()
    return None


def int8_shape(expr) -> tuple | None:
    """Static shape with the leading dim ``None`` if symbolic; ``None`` unless int8 with static inner dims."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or str(ty.dtype) != "int8":
        return None
    dims = [int(d) if isinstance(d, tirx.IntImm) else None for d in ty.shape.values]
    return tuple(dims) if dims and None not in dims[1:] else None


class Int8KernelSwap(PyExprMutator):
    """Swap eligible int8 ``matmul``/``conv2d`` calls for a backend's kernels (see the module docstring)."""

    #: kernel name prefix: kernels are ``<prefix><key parts joined by _>``
    prefix = "hago_"

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.count = 0
        self.skipped: list[str] = []  # op names of the int32-accumulating calls left as they were

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or str(getattr(call.attrs, "out_dtype", "")) != "int32":
            return call
        if call.op.name == "relax.matmul":
            new = self._dense(call)
        elif call.op.name == "relax.nn.conv2d":
            new = self._conv2d(call)
        else:
            return call
        if new is None:
            self.skipped.append(call.op.name)
            return call
        self.count += 1
        return new

    def _dense(self, call: relax.Call) -> relax.Expr | None:
        x, w = int8_shape(call.args[0]), const_int8(call.args[1])
        if x is None or len(x) != 2 or w is None or w.ndim != 2:
            return None
        return self.dense(call, x, w)

    def _conv2d(self, call: relax.Call) -> relax.Expr | None:
        a = call.attrs
        x, w = int8_shape(call.args[0]), const_int8(call.args[1])
        layouts = (a.data_layout, a.kernel_layout, a.out_layout) == ("NCHW", "OIHW", "NCHW")
        if x is None or len(x) != 4 or w is None or not layouts or int(a.groups) != 1:
            return None
        strides, padding, dilation = ([int(v) for v in attr] for attr in (a.strides, a.padding, a.dilation))
        return self.conv2d(call, x, w, strides, padding, dilation)

    def kernel(self, key: tuple, make) -> tvm.ir.GlobalVar:
        """The kernel for ``key`` (one per shape), made by ``make(name)`` the first time it is asked for."""
        if key not in self.kernels:
            name = self.prefix + "_".join(str(p) for p in key).replace("-", "m")
            self.kernels[key] = self.builder_.add_func(make(name), name)
        return self.kernels[key]

    def dense(self, call: relax.Call, x: tuple, w: np.ndarray) -> relax.Expr | None:
        """The replacement of int8 ``x [m, K] @ w [K, N]`` (``x``: its shape), or None to decline."""
        return None

    def conv2d(self, call: relax.Call, x: tuple, w: np.ndarray, strides: list, padding: list,
               dilation: list) -> relax.Expr | None:
        """The replacement of an NCHW/OIHW int8 conv2d (``x``: the data shape, ``w`` OIHW), or None to decline."""
        return None


def swap_kernels(mod: tvm.IRModule, swap: Int8KernelSwap) -> tvm.IRModule:
    """Run ``swap`` (made on ``mod``) over every Relax function of ``mod``; returns the new module."""
    return rewrite_relax_functions(mod, swap)
