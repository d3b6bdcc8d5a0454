"""simulate: the FP32 graph with simulated (fake) quantization on every edge.

HAGO's annotate stage puts ``simulated_quantize`` on each edge; here that is
a ``dequantize(quantize(x))`` pair with the edge's calibrated scale and zero
point, and integer layers get their weights rounded to the strategy's bits.
The result is a float program whose values carry the same rounding and
clipping as the integer build, which is what bit-width search and
calibration studies need: it changes nothing but constants between
strategies, and it runs on any device TVM builds for.

Runs after ``calibrate`` (it needs ranges). ``realize`` is the exact integer
twin; tests check the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as O

from . import sparq
from .dynamic import fake_quantize_rows
from .errors import QuantizeError
from .graph import Graph
from .qparams import container_dtype
from .realize import bf16, handler_for
from .realize.multipoint import simulated_weight
from .realize.quant import bias_shape, dequantize, fake_quantized_weight, quantize, substitute
from .strategy import Strategy


def _fake_quant(bb: relax.BlockBuilder, x, qp) -> relax.Expr:
    """``x`` quantized and dequantized with ``qp``, exactly as realize quantizes the edge."""
    return bb.emit(dequantize(bb.emit(quantize(x, qp)), qp))


def range_input_values(qp) -> np.ndarray:
    """``[scale, zero_point]`` (float32): what a ``range_inputs`` edge's parameter of ``main`` holds for ``qp``."""
    return np.array([float(qp.scale), float(qp.zero_point)], np.float32)


def _fake_quant_param(bb: relax.BlockBuilder, x, qp, param: relax.Var) -> relax.Expr:
    """``x`` fake-quantized with the scale and zero point in ``param`` (``[2]`` float32, run time).

    The same ops as :func:`_fake_quant` with the constants replaced by scalars
    taken from ``param``: ``quantize``/``dequantize`` (or round/clip for
    sub-byte values) accept tensor parameters, and the zero point is cast to
    the container dtype as the constant is, so an input equal to
    :func:`range_input_values` of ``qp`` gives bit-identical values. Only
    ``qp``'s dtype and integer range are baked in.
    """
    cdt = container_dtype(qp.dtype)
    scale = bb.emit(O.take(param, relax.const(0, "int64"), axis=0, mode="clip"))
    zp_f = bb.emit(O.take(param, relax.const(1, "int64"), axis=0, mode="clip"))
    zp = bb.emit(O.astype(zp_f, cdt))
    lo, hi = np.iinfo(cdt).min, np.iinfo(cdt).max
    if (qp.qmin, qp.qmax) == (lo, hi):
        q = bb.emit(O.quantize(x, scale, zp, axis=-1, out_dtype=cdt))
    else:
        r = bb.emit(O.add(O.round(O.divide(x, scale)), zp_f))
        q = bb.emit(O.astype(O.clip(r, qp.qmin, qp.qmax), cdt))
    return bb.emit(O.dequantize(q, scale, zp))


def simulate(graph: Graph, strategy: Strategy, *, fake: bool = True, bias_inputs: Sequence[str] = (),
             taps: Sequence[str] = (), local: bool = False, range_inputs: Sequence[str] = (),
             twin_graph: Graph | None = None, weight_inputs: Sequence[str] = (),
             edge_taps: Sequence[str] = ()) -> tvm.IRModule:
    """Return the FP32 ``main`` of ``graph`` with fake quantization per ``strategy``.

    Biases are ``node.bias`` (so a graph from :func:`hago.correct.corrected_graph`
    simulates the corrected biases). The keyword arguments serve
    :mod:`hago.correct`, which re-runs one compiled program many times:

    * ``fake=False`` keeps every value float (the FP32 twin with the same taps);
    * ``bias_inputs``: these weighted nodes take their bias as an extra ``[C]``
      float32 parameter of ``main`` (after the model inputs, in this order), so a
      correction can change biases without rebuilding;
    * ``range_inputs``: these static, calibrated edges (no alias, not dynamic)
      take their scale and zero point from an extra ``[2]`` float32 parameter of
      ``main`` each (``[scale, zero_point]``, :func:`range_input_values`; after
      the bias inputs, in this order), so a correction can try many clipping
      ranges on one build (:mod:`hago.correct.lapq`). The integer layers'
      rounded weights stay those of the strategy's ranges (their scale floor
      depends on the input scale only for all-but-dead channels), and a local
      twin (``local=True``) keeps the strategy's constants;
    * ``taps``: ``main`` returns, instead of the model output, a tuple with the
      per-sample, per-output-channel mean (``[N, C]``) of each named weighted
      node's output (after its bias, before its output edge is fake-quantized);
    * ``local=True`` (with ``fake=False``): each tap becomes two, the FP32 layer
      output and the layer's quantized twin on the same FP32 input (input
      fake-quantized with its edge's parameters, weights rounded): the error one
      layer adds by itself, with no error arriving from earlier layers.
      ``twin_graph`` (a :func:`hago.correct.corrected_graph` of ``graph``) gives
      the twins their weights and biases while the network itself runs on
      ``graph``'s: a corrected layer measured on the true FP32 input;
    * ``weight_inputs``: these integer weighted nodes take their (already
      quantized) float weight as an extra parameter of ``main`` each, in their
      own layout (after the range inputs, in this order), so a correction can
      change weights without rebuilding (:mod:`hago.correct.gptq`'s sequential pass);
    * ``edge_taps`` (without ``taps``): ``main`` returns these edges' whole tensors
      as their consumers see them (fake-quantized where the strategy quantizes
      them), instead of the model output.
    """
    bb = relax.BlockBuilder(graph.support_module())  # the importer's helpers main may call
    func = graph.func
    params = [relax.Var(p.name, p.ty) for p in func.params]
    remap: dict = {}
    pre: dict = {}  # var -> its value before fake quantization
    edge_of_var = {v: e for e, v in graph.edge_var.items()}
    node_of_var = {n.var: n for n in graph.nodes}
    tap_set = set(taps)
    twins: dict = {}  # node name -> output of its local quantized twin (local=True)
    bias_vars = {}
    for name in bias_inputs:
        n = graph.node(name)
        channels = n.weight.shape[0] if n.kind != "dense" else n.weight.shape[1]
        bias_vars[name] = relax.Var(f"hago_bias_{name}", relax.TensorType([channels], "float32"))
    range_vars = {}
    for edge in range_inputs:
        choice = strategy.edges.get(edge)
        if choice is None or not choice.bits or choice.alias_of is not None or choice.dynamic or choice.qparams is None:
            raise QuantizeError(f"simulate: range input {edge!r} is not a calibrated static edge of the strategy")
        range_vars[graph.edge_var[edge]] = relax.Var(f"hago_range_{edge}", relax.TensorType([2], "float32"))

    weight_vars = {name: relax.Var(f"hago_weight_{name}", relax.TensorType(list(graph.node(name).weight.shape),
                                                                          "float32"))
                   for name in weight_inputs}

    def subst(expr):
        return substitute(expr, lambda v: remap.get(v, v))

    def after(var, value):
        pre[var] = value
        edge = edge_of_var.get(var)
        choice = strategy.edges.get(edge) if (edge and fake) else None
        if choice is not None and choice.bits and choice.alias_of is None and choice.dynamic:
            value = fake_quantize_rows(bb, value)  # per-row parameters at run time, as realize does
        elif choice is not None and var in range_vars:  # checked above: a calibrated static edge
            value = _fake_quant_param(bb, value, choice.qparams, range_vars[var])
        elif choice is not None and choice.bits and choice.alias_of is None and choice.qparams is not None:
            value = _fake_quant(bb, value, choice.qparams)
        remap[var] = value

    def with_bias(node, acc):
        """``acc + bias`` for a weighted node: its bias input, ``node.bias``, or nothing."""
        shape = bias_shape(node)
        if node.name in bias_vars:
            return bb.emit(O.add(acc, O.reshape(bias_vars[node.name], shape)))
        if node.bias is not None:
            return bb.emit(O.add(acc, relax.const(node.bias.reshape(shape).astype(np.float32), "float32")))
        return acc

    attrs = {k: v for k, v in func.attrs.items()} if func.attrs else None
    extra = list(bias_vars.values()) + list(range_vars.values()) + list(weight_vars.values())
    with bb.function("main", params + extra, attrs=attrs):
        with bb.dataflow():
            for old, new in zip(func.params, params):
                after(old, new)
            for blk in func.body.blocks:
                for b in blk.bindings:
                    if b.var in graph.fused_vars:  # a weighted node's bias add: emitted with the node
                        continue
                    value = b.value
                    node = node_of_var.get(b.var)
                    mode = strategy.ops[node.name].mode if node is not None else None
                    if fake and mode == "integer":
                        handler = handler_for(strategy, node)  # its constants as realize quantizes them
                        value = handler.simulated_call(node, value, strategy) if handler else value
                        value = sparq.simulated_call(bb, node, value, strategy, subst)  # SPARQ specs only
                        if node.name in weight_vars:
                            value = relax.Call(value.op, [value.args[0], weight_vars[node.name]], value.attrs,
                                               value.ty_args)
                    elif fake and mode == "bf16":  # emitted here: the rounding needs the substituted input
                        value = bf16.simulated(bb, node, subst(value.args[0]))
                    if local and node is not None and node.name in tap_set:
                        twin_node = twin_graph.node(node.name) if twin_graph is not None else node
                        twins[node.name] = _local_twin(bb, twin_node, strategy, subst(value), with_bias)
                    if node is not None and node.weighted:
                        acc = bb.emit(subst(value))
                        out = with_bias(node, acc)
                        if node.out_var is not node.var:
                            remap[node.var] = acc
                        after(node.out_var, out)
                        continue
                    after(b.var, bb.emit(subst(value)))
            if taps:
                means = []
                for name in taps:
                    n = graph.node(name)
                    means.append(_channel_mean(bb, n, pre[n.out_var]))
                    if local:
                        means.append(_channel_mean(bb, n, twins[name]))
                out = bb.emit_output(relax.Tuple(means))
            elif edge_taps:
                out = bb.emit_output(relax.Tuple([remap[graph.edge_var[e]] for e in edge_taps]))
            else:
                out = bb.emit_output(subst(func.body.body))
        bb.emit_func_output(out)
    return relax.transform.Normalize()(bb.get())


def _channel_mean(bb: relax.BlockBuilder, node, v) -> relax.Expr:
    """``[C]``: the mean of a weighted node's output over everything but its channel axis, batch included.

    A dense layer's input may have its batch merged with other axes (a
    transformer's ``[N*T, C]``), so the batch is averaged here, never sliced.
    """
    ndim = len(node.out_var.ty.shape)
    axes = [0, 2, 3] if node.kind != "dense" else list(range(ndim - 1))
    return bb.emit(O.mean(v, axis=axes))


def _local_twin(bb: relax.BlockBuilder, node, strategy: Strategy, call: relax.Call, with_bias) -> relax.Expr:
    """``node``'s op on its fake-quantized FP32 input with rounded weights, plus its bias."""
    x = call.args[0]
    choice = strategy.resolved(node.inputs[0])
    if choice.dynamic:
        xq = fake_quantize_rows(bb, x)
    elif choice.bits and choice.qparams is not None:
        xq = _fake_quant(bb, x, choice.qparams)
    else:
        xq = x
    sx = float(choice.qparams.scale) if choice.qparams is not None else None
    op = strategy.ops[node.name]
    if op.weight_scale is not None:  # trained integer weights on their own grid (hago.qat)
        w = relax.const(fake_quantized_weight(node, op.weight_bits, sx, op.weight_scale), "float32")
    else:
        w = relax.const(simulated_weight(node, op, sx), "float32")  # multipoint points too
    return with_bias(node, bb.emit(relax.Call(call.op, [xq, w], call.attrs, call.ty_args)))
