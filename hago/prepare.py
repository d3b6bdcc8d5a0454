"""Prepare: simplify an imported graph into the canonical form annotate expects.

Runs after :func:`hago.frontend.load_model` (weights bound as constants, main
in a dataflow block) and before annotation. Quantization must see the graph
the hardware will run, so inference-only rewrites happen here, once:

1. ``CanonicalizeBindings`` removes the torch importer's tuple noise
   (``t = (pool, zeros_like(pool)); y = t[0]`` becomes ``y = pool``);
2. ``FoldConstant`` turns ``reshape(bias)`` and ``permute_dims(W)`` into constants;
3. :func:`commute_constants` puts constants second in ``add(c, x)``, so bias
   adds look the same from every frontend;
4. :func:`hago.importer_ops.restore_relax_ops` turns the ``call_tir`` helpers
   TVM's ONNX importer emits for ``Clip`` and ``Pad`` back into ``clip`` and
   ``nn.pad``, and :func:`hago.conv1d.conv1d_as_conv2d` runs 1-D convs and
   pools as 2-D ones of unit height: every later pass sees conv2d;
5. :func:`fold_batch_norm` folds inference batch norm into the preceding
   conv2d weights and bias: a quantized conv must carry the folded weights,
   or the weight ranges calibrated are not those that run; any other batch
   norm with constant statistics becomes one multiply and one add. The
   folded batch norms' output statistics (per channel mean ``beta`` and std
   ``|gamma|``) are kept on the module (:data:`hago.graph.BN_STATS_ATTR`,
   outside ``main``, so the graph hash is unchanged) for the data-free
   corrections (:mod:`hago.correct.bias_data_free`);
6. :func:`fold_pad_into_conv` merges a zero, spatial-only ``nn.pad`` into
   the padding of the NCHW conv2d it feeds (TF-ported nets such as
   EfficientNet-Lite pad explicitly for "SAME"): realize pads with the input
   zero point, so the pad must be the conv's own to stay in integer;
7. ``DecomposeOpsForInference`` lowers any batch norm still left
   (non-constant statistics) to arithmetic;
8. ``FoldConstant`` again, :func:`fuse_silu` turns ``x * sigmoid(x)`` (how
   ``torch.onnx.export`` writes SiLU / Swish) into one ``nn.silu``, so an
   integer conv can apply it in its own write-back, then
   ``DeadCodeElimination`` drops the bindings left unused (the
   ``zeros_like`` pooling indices, the folded batch norms, the sigmoids).

Right after the first ``FoldConstant``, :func:`hago.safe_index.safe_index`
bounds every run-time index (gather, embedding, scatter): no later stage
and no build sees an unchecked one; then :func:`hago.split_slices.split_as_slices`
turns each read of a ``split``'s part into a ``strided_slice``, so every
tensor a layer reads is a call's output (an edge of :mod:`hago.graph`).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import TupleGetItemPattern, is_const, is_op, rewrite_call, wildcard
from tvm.relax.expr_functor import PyExprMutator, mutator

from .conv1d import conv1d_as_conv2d
from .graph import bn_stats, weight_key, with_bn_stats
from .importer_ops import restore_relax_ops
from .relax_rewrite import rewrite_relax_functions
from .safe_index import safe_index
from .split_slices import split_as_slices

__all__ = ["prepare", "prepare_passes", "commute_constants", "fold_batch_norm", "fold_pad_into_conv", "fuse_silu"]

_COMMUTATIVE = ("relax.add", "relax.multiply", "relax.maximum", "relax.minimum")


def prepare(mod: tvm.IRModule) -> tvm.IRModule:
    """Canonicalize, fold constants and batch norms, and drop dead code (see module docstring).

    TVM's native warnings a user cannot act on are hidden while it runs: folding a constant
    ``take(mode="fast")`` (ConvNeXt's, ViT's and Swin's index tables) prints "Fast mode segfaults ..." once per
    take, though :func:`hago.safe_index.safe_index` bounds every run-time index right after.
    """
    from .native_log import drop_native_lines

    with drop_native_lines():
        return prepare_passes()(mod)


def prepare_passes() -> tvm.transform.Pass:
    """The prepare stage as one ``Sequential``, for composing into larger pipelines."""
    return tvm.transform.Sequential(
        [
            relax.transform.CanonicalizeBindings(),
            relax.transform.FoldConstant(),
            safe_index(),
            split_as_slices(),
            commute_constants(),
            restore_relax_ops(),
            conv1d_as_conv2d(),
            fold_batch_norm(),
            conv1d_as_conv2d(),  # again: the squeezes a folded 1-D batch norm leaves behind
            fold_pad_into_conv(),
            relax.transform.DecomposeOpsForInference(),
            relax.transform.FoldConstant(),
            commute_constants(),
            fuse_silu(),
            relax.transform.DeadCodeElimination(),
            relax.transform.CanonicalizeBindings(),
        ],
        name="hago.prepare",
    )


def commute_constants() -> tvm.transform.Pass:
    """Rewrite ``op(const, x)`` to ``op(x, const)`` for commutative elementwise ops.

    The torch importer emits linear bias adds as ``add(bias, matmul)`` and
    conv bias adds as ``add(conv, bias)``; annotate matches one order only.
    Runs after ``FoldConstant`` so folded ``reshape(bias)`` counts as a constant.
    """
    return _CommuteConstants()


def fold_batch_norm() -> tvm.transform.Pass:
    """Fold ``batch_norm(conv2d(x, W) [+ b])`` (inference mode) into ``conv2d(x, W') + b'``.

    TVM's ``FoldBatchnormToConv2D`` only matches a bias-free conv; torch convs
    usually carry a bias add in between. The new weights are computed in
    float64 numpy: ``s = gamma / sqrt(var + eps)``, ``W' = W * s``,
    ``b' = (b - mean) * s + beta``. Needs constants already folded
    (``FoldConstant``) and bias adds with the constant second
    (:func:`commute_constants`). Declines non-NCHW/OIHW convs and
    training-mode batch norms. A batch norm with constant statistics that
    does not follow a conv becomes ``x * s + t`` instead.

    Each folded batch norm's output statistics, ``(beta, |gamma| *
    sqrt(var / (var + eps)))`` per channel (exact when the running statistics
    are those of the conv's output), are kept on the module under the folded
    weight's key (:func:`hago.graph.weight_key`): after folding they are the
    mean and std of the conv's output, which :func:`hago.graph.analyze`
    attaches to the node as ``bn_stats``.
    """
    return _FoldBatchNormKeepStats()


@tvm.transform.module_pass(opt_level=0, name="hago.FoldBatchNormKeepStats")
class _FoldBatchNormKeepStats:
    """:class:`_FoldBatchNorm` on every Relax function, then the statistics it saw onto the module."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        stats: dict = {}
        mod = _FoldBatchNorm(stats)(mod)
        return with_bn_stats(mod, {**bn_stats(mod), **stats}) if stats else mod


def fold_pad_into_conv() -> tvm.transform.Pass:
    """Rewrite ``conv2d(pad(x, 0 on H/W only), W)`` (NCHW) to ``conv2d(x, W, padding += pad)``.

    Declines reflect/edge pads, non-zero pad values, pads on N or C, and
    non-NCHW convs; those keep their explicit pad.
    """
    return _FoldPadIntoConv()


@relax.transform.function_pass(opt_level=0, name="hago.FoldPadIntoConv")
class _FoldPadIntoConv:
    def __init__(self):
        self.data = wildcard()
        self.pad = is_op("relax.nn.pad")(self.data)
        self.conv = is_op("relax.nn.conv2d")(self.pad, wildcard())

    def transform_function(self, func: relax.Function, mod: tvm.IRModule, ctx) -> relax.Function:
        if func.attrs is not None and int(func.attrs.get("Primitive", 0)):
            return func
        return rewrite_call(self.conv, self._fold, func)

    def _fold(self, expr: relax.Expr, matches) -> relax.Expr:
        conv, pad = matches[self.conv], matches[self.pad]
        pa, ca = pad.attrs, conv.attrs
        width = [int(v) for v in pa.pad_width]
        if (str(pa.pad_mode) != "constant" or float(pa.pad_value) != 0.0 or len(width) != 8
                or any(width[:4]) or min(width) < 0 or ca.data_layout != "NCHW"):
            return expr
        top, left, bottom, right = (int(v) for v in ca.padding)
        h0, h1, w0, w1 = width[4:]
        return relax.op.nn.conv2d(matches[self.data], conv.args[1], strides=ca.strides,
                                  padding=[top + h0, left + w0, bottom + h1, right + w1],
                                  dilation=ca.dilation, groups=int(ca.groups), data_layout=ca.data_layout,
                                  kernel_layout=ca.kernel_layout, out_layout=ca.out_layout,
                                  out_dtype=ca.out_dtype)


def fuse_silu() -> tvm.transform.Pass:
    """Rewrite ``x * sigmoid(x)`` (either order) to ``nn.silu(x)``.

    ONNX had no SiLU op before opset 24, so ``torch.onnx.export`` writes
    every SiLU (EfficientNet, YOLO, ...) as a sigmoid and a multiply of the
    same tensor. As two float ops they sit between a quantized conv and the
    next, and cost the integer build two float passes per activation (the
    int32 accumulator dequantized, then requantized for the next conv:
    EfficientNet-B0's INT8 build spent half its time there). As one
    ``nn.silu`` node the graph knows it as an activation: an integer conv
    applies it in its requantizing write-back (:mod:`hago.realize.silu`),
    and the float build lowers it with the same fast sigmoid as before.
    A sigmoid with other readers stays and is shared.
    """
    return _FuseSiLU()


@relax.transform.function_pass(opt_level=0, name="hago.FuseSiLU")
class _FuseSiLU:
    def __init__(self):
        self.sigmoid = is_op("relax.sigmoid")(wildcard())
        self.x = wildcard()
        self.pattern = is_op("relax.multiply")(self.sigmoid, self.x)  # DPL matches multiply in either order

    def transform_function(self, func: relax.Function, mod: tvm.IRModule, ctx) -> relax.Function:
        if func.attrs is not None and int(func.attrs.get("Primitive", 0)):
            return func
        return rewrite_call(self.pattern, self._fuse, func)

    def _fuse(self, expr: relax.Expr, matches) -> relax.Expr:
        # the matches are the bound values; the multiply's own arguments are the variables
        x = matches[self.sigmoid].args[0]
        if not (isinstance(x, relax.Var) and any(a.same_as(x) for a in expr.args)
                and not all(a.same_as(x) for a in expr.args)):
            return expr
        return relax.op.nn.silu(x)


@tvm.transform.module_pass(opt_level=0, name="hago.CommuteConstants")
class _CommuteConstants:
    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(mod, _CommuteMutator(mod))


@mutator
class _CommuteMutator(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if (isinstance(call.op, tvm.ir.Op) and call.op.name in _COMMUTATIVE and len(call.args) == 2
                and _is_const(call.args[0]) and not _is_const(call.args[1])):
            return relax.Call(call.op, [call.args[1], call.args[0]], call.attrs, span=call.span)
        return call


@relax.transform.function_pass(opt_level=0, name="hago.FoldBatchNorm")
class _FoldBatchNorm:
    def __init__(self, stats: dict | None = None):
        self.stats = stats if stats is not None else {}  # weight key -> (mean, std) of the folded output
        self.data = wildcard()
        self.weight = is_const()
        self.bias = is_const()
        self.conv = is_op("relax.nn.conv2d")(self.data, self.weight)
        self.biased = is_op("relax.add")(self.conv, self.bias)
        self.bn_args = [is_const() for _ in range(4)]  # gamma, beta, mean, var
        self.bn = is_op("relax.nn.batch_norm")(self.conv | self.biased, *self.bn_args)
        self.pattern = TupleGetItemPattern(self.bn, 0)
        self.any_input = wildcard()
        self.any_bn = is_op("relax.nn.batch_norm")(self.any_input, *self.bn_args)
        self.any_pattern = TupleGetItemPattern(self.any_bn, 0)

    def transform_function(self, func: relax.Function, mod: tvm.IRModule, ctx) -> relax.Function:
        if func.attrs is not None and int(func.attrs.get("Primitive", 0)):
            return func
        func = rewrite_call(self.pattern, self._into_conv, func)
        return rewrite_call(self.any_pattern, self._into_scale_shift, func)

    def _scale_shift(self, bn: relax.Call, matches, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(s, t)`` with ``batch_norm(y + bias) == y * s + t``, in float64."""
        gamma, beta, mean, var = (matches[p].value.numpy().astype(np.float64) for p in self.bn_args)
        attrs = bn.attrs
        scale = (gamma if attrs.scale else np.ones_like(var)) / np.sqrt(var + float(attrs.epsilon))
        return scale, (bias - mean) * scale + (beta if attrs.center else 0.0)

    def _output_stats(self, bn: relax.Call, matches) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the batch norm's output, per channel, if its input has the running statistics."""
        gamma, beta, _, var = (matches[p].value.numpy().astype(np.float64) for p in self.bn_args)
        attrs = bn.attrs
        gamma = gamma if attrs.scale else np.ones_like(var)
        mean = beta if attrs.center else np.zeros_like(var)
        return mean, np.abs(gamma) * np.sqrt(var / (var + float(attrs.epsilon)))

    def _into_conv(self, expr: relax.Expr, matches) -> relax.Expr:
        conv, bn = matches[self.conv], matches[self.bn]
        ca = conv.attrs
        layouts_ok = (ca.data_layout == "NCHW" and ca.kernel_layout == "OIHW"
                      and ca.out_layout == "NCHW" and int(bn.attrs.axis) in (1, -3))
        if not layouts_ok or bool(bn.attrs.training):
            return expr
        weight = matches[self.weight].value.numpy()
        channels = weight.shape[0]
        bias = np.zeros(channels)
        if self.bias in matches:
            bias = matches[self.bias].value.numpy().astype(np.float64)
            if bias.size != channels:  # e.g. a scalar add: not a per-channel bias, decline
                return expr
            bias = bias.reshape(channels)
        scale, shift = self._scale_shift(bn, matches, bias)
        folded = (weight * scale.reshape(-1, 1, 1, 1)).astype(weight.dtype)
        self.stats[weight_key(folded)] = self._output_stats(bn, matches)
        new_w = relax.const(folded)
        new_b = relax.const(shift.reshape(1, channels, 1, 1).astype(weight.dtype))
        new_conv = relax.Call(conv.op, [matches[self.data], new_w], ca, span=conv.span)
        return relax.op.add(new_conv, new_b)

    def _into_scale_shift(self, expr: relax.Expr, matches) -> relax.Expr:
        """A batch norm not after a conv becomes ``x * s + t``: two ops instead of four."""
        bn, data = matches[self.any_bn], matches[self.any_input]
        ty = data.ty
        if bool(bn.attrs.training) or not isinstance(ty, relax.TensorType) or ty.ndim < 1:
            return expr
        axis = int(bn.attrs.axis) % ty.ndim
        scale, shift = self._scale_shift(bn, matches, np.zeros(1))
        shape = [1] * ty.ndim
        shape[axis] = scale.size
        def const(a):
            return relax.const(a.reshape(shape).astype(str(ty.dtype)))
        return relax.op.add(relax.op.multiply(data, const(scale)), const(shift))


def _is_const(expr: relax.Expr) -> bool:
    return isinstance(expr, tvm.ir.expr.Constant)
