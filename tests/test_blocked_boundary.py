"""A float layer between x86 integer layers runs on their blocked NCHW16c layout: no NCHW round trip (issue 15).

An int8 VNNI conv feeding a float conv returns its int32 accumulator through a
Relax ``layout_transform``; a float conv feeding an int8 one is quantized after
a Relax ``layout_transform`` to NCHW16c. After ConvertLayout blocks the float
conv, :func:`~hago.backends.cpu.layout_pairs.cancel_layout_pairs` drops each
transform with its inverse, and the bias, dequantize and activation between
them run on the blocked tensor. The old route (the int8 conv's own NCHW
conversions, kept by patching the plan's two hints and the pass off) is the
reference: the outputs must be bit-identical, with fewer passes.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

import tvm
from tvm import relax
from tvm.relax import op as O

import hago.backends.cpu.float_layout as float_layout
from hago import build as hago_build
from hago.annotate import AnnotateConfig
from hago.backends.cpu.layout_pairs import cancel_layout_pairs, relayout_const
from hago.backends.x86.plan import X86Plan
from hago.compiler import quantize
from hago.hwspec import HardwareSpec
from hago.pipeline import lower, prepare_model
from irstats import fused_calls

pytestmark = pytest.mark.llvm

SPEC = HardwareSpec.load("x86-avx512-vnni")
SIZE = 20


class Chain(nn.Module):
    """conv (int8) -> relu -> conv (fp32) -> relu -> conv (int8), 3x3 padded: both boundaries pad."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(16, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, 32, 3,
                                                                                                           padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class Residual(nn.Module):
    """The int8 conv's output feeds the fp32 conv and a float add with its result; a 1x1 int8 conv after."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 16, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(torch.relu(self.b(torch.relu(y)) + y))


class Pooled(nn.Module):
    """ReLU6 (a clip), a stride-2 fp32 conv and a max-pool between the int8 layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(16, 32, 1), nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.Conv2d(48, 16, 3,
                                                                                                             padding=1)

    def forward(self, x):
        f = nn.functional
        return self.c(f.max_pool2d(f.relu6(self.b(f.relu6(self.a(x)))), 2))


def _flat(out) -> np.ndarray:
    """A VM result, one tensor or a tuple of them, as one flat array."""
    return out.numpy().ravel() if hasattr(out, "numpy") else np.concatenate([_flat(o) for o in out])


def _old_route(mp) -> None:
    """The route before blocked boundaries: no layout hints from the plan, no round-trip removal."""
    mp.setattr(X86Plan, "float_layout_produced", lambda self, edge: None)
    mp.setattr(X86Plan, "float_layout_consumed", lambda self, edge: None)
    mp.setattr(float_layout, "cancel_layout_pairs", lambda mod: mod)


def _builds(model: nn.Module, float_convs: list[int], monkeypatch):
    """``{"old"|"new": (calls, outputs)}`` of ``model`` with the given convs pinned to fp32, the rest int8."""
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 16, SIZE, SIZE)).astype("float32")
    x = rng.standard_normal((2, 16, SIZE, SIZE)).astype("float32")
    prep = prepare_model(model.eval(), calib, example_inputs=(torch.zeros(1, 16, SIZE, SIZE),))
    convs = [n.name for n in prep.graph.nodes if n.kind == "conv2d"]
    q = quantize(prep, SPEC, annotate_config=AnnotateConfig(float_ops=frozenset(convs[i] for i in float_convs)))
    assert [q.strategy.ops[c].mode for c in convs] == ["float" if i in float_convs else "integer"
                                                       for i in range(len(convs))]
    out = {}
    for route in ("old", "new"):
        with monkeypatch.context() as mp:
            if route == "old":
                _old_route(mp)
            _, realized = lower(prep, q.strategy, SPEC, batch=1)
            calls = fused_calls(realized.mod, SPEC)
            vm = relax.VirtualMachine(hago_build.build_for(realized.mod, SPEC), tvm.cpu())
        ys = np.concatenate([_flat(vm["main"](tvm.runtime.tensor(x[i:i + 1]))) for i in range(len(x))])
        out[route] = (calls, ys)
    return out


@pytest.mark.parametrize("model", [Chain, Residual, Pooled], ids=["chain", "residual", "relu6-pool-stride2"])
def test_float_conv_between_int8_convs_runs_blocked(model, monkeypatch):
    torch.manual_seed(0)
    builds = _builds(model(), [1], monkeypatch)
    (old_calls, old_y), (new_calls, new_y) = builds["old"], builds["new"]
    # before: each boundary went through NCHW (the conv's own conversions and ConvertLayout's transforms)
    assert old_calls["te_layout_transform"] >= 2 and old_calls["hago_nchw_to_nchwc"] == 2, old_calls
    # now: NCHW only at the network's input and output
    assert new_calls["te_layout_transform"] == 0, new_calls
    assert new_calls["hago_nchw_to_nchwc"] == 1 and new_calls["hago_nchwc_to_nchw"] == 1, new_calls
    assert sum(new_calls.values()) <= sum(old_calls.values()) - 4, (old_calls, new_calls)
    np.testing.assert_array_equal(new_y, old_y)
    assert np.abs(new_y).max() > 0.1  # a real signal went through all three layers


def test_channels_not_in_16s_keep_the_nchw_boundary(monkeypatch):
    """24 channels: the fp32 conv takes 8-channel blocks, not the integer layers' 16: nothing changes."""
    torch.manual_seed(0)
    builds = _builds(Chain(24), [1], monkeypatch)
    (old_calls, old_y), (new_calls, new_y) = builds["old"], builds["new"]
    assert new_calls == old_calls and new_calls["te_layout_transform"] == 2
    np.testing.assert_array_equal(new_y, old_y)


# ---- the round-trip removal on its own ---------------------------------------------------


def _to_blocked(block: int):
    return lambda n, c, h, w: (n, c // block, h, w, c % block)


def _module(body, shape=(1, 2, 6, 6, 16)):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _count(mod, op: str) -> int:
    n = 0

    def visit(e):
        nonlocal n
        n += isinstance(e, relax.Call) and getattr(e.op, "name", "") == op

    relax.analysis.post_order_visit(mod["main"], visit)
    return n


def _run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


RNG = np.random.default_rng(3)
BIAS = RNG.standard_normal((1, 32, 1, 1)).astype("float32")


def _round_trip(bb, x, extra_output=False, block=16):
    """blocked -> NCHW -> relu, + per-channel bias, * scalar, astype -> NCHW{block}c."""
    u = bb.emit(O.layout_transform(x, lambda n, c, h, w, lane: (n, c * 16 + lane, h, w)))
    v = bb.emit(O.nn.relu(u))
    v = bb.emit(O.add(v, relax.const(BIAS)))
    v = bb.emit(O.multiply(relax.const(np.float32(0.5)), v))
    v = bb.emit(O.astype(O.astype(v, "float16"), "float32"))
    w = bb.emit(O.layout_transform(v, _to_blocked(block)))
    return relax.Tuple([w, v]) if extra_output else w


def test_round_trip_with_element_wise_ops_between_is_dropped():
    mod = _module(_round_trip)
    out = cancel_layout_pairs(mod)
    assert _count(mod, "relax.layout_transform") == 2 and _count(out, "relax.layout_transform") == 0
    x = RNG.standard_normal((1, 2, 6, 6, 16)).astype("float32")
    np.testing.assert_array_equal(_run(out, x), _run(mod, x))


@pytest.mark.parametrize("case", ["value-also-returned-plain", "other-block-size"])
def test_round_trip_is_kept_where_the_plain_value_matters(case):
    if case == "value-also-returned-plain":
        mod = _module(lambda bb, x: _round_trip(bb, x, extra_output=True))
    else:  # NCHW16c -> NCHW -> NCHW8c is a change of layout, not a round trip
        mod = _module(lambda bb, x: _round_trip(bb, x, block=8))
    out = cancel_layout_pairs(mod)
    assert _count(out, "relax.layout_transform") == 2
    assert out is mod  # untouched


def test_direct_pair_is_dropped():
    mod = _module(lambda bb, x: bb.emit(O.nn.relu(bb.emit(O.layout_transform(
        bb.emit(O.layout_transform(x, lambda n, c, h, w, lane: (n, c * 16 + lane, h, w))), _to_blocked(16))))))
    out = cancel_layout_pairs(mod)
    assert _count(out, "relax.layout_transform") == 0 and _count(out, "relax.nn.relu") == 1
    x = RNG.standard_normal((1, 2, 6, 6, 16)).astype("float32")
    np.testing.assert_array_equal(_run(out, x), np.maximum(x, 0))


def test_per_channel_constant_is_laid_out_like_the_tensor():
    m2 = O.layout_transform(relax.Var("u", relax.TensorType((1, 32, 6, 6), "float32")), _to_blocked(16)).attrs.index_map
    c = np.arange(32, dtype="float32").reshape(1, 32, 1, 1)
    r = relayout_const(c, m2, [1, 32, 6, 6], [1, 2, 6, 6, 16])
    assert r.shape == (1, 2, 1, 1, 16)
    np.testing.assert_array_equal(r[0, :, 0, 0, :].reshape(-1), np.arange(32))
    assert relayout_const(np.float32(2.0), m2, [1, 32, 6, 6], [1, 2, 6, 6, 16]).shape == ()
    # a constant varying along H only: the blocked axes it maps to keep it, the channel blocks broadcast
    rows = np.arange(6, dtype="float32").reshape(1, 1, 6, 1)
    r = relayout_const(rows, m2, [1, 32, 6, 6], [1, 2, 6, 6, 16])
    assert r.shape == (1, 1, 6, 1, 1) and r.reshape(-1).tolist() == list(range(6))


def test_one_value_converted_twice_is_converted_once():
    """ConvertLayout converts a plain value once per blocked consumer; the copies are one transform."""
    def body(bb, x):
        y = bb.emit(O.nn.relu(x))
        a = bb.emit(O.layout_transform(y, _to_blocked(16)))
        b = bb.emit(O.layout_transform(y, _to_blocked(16)))
        c = bb.emit(O.layout_transform(y, _to_blocked(8)))  # another layout: a transform of its own
        return relax.Tuple([bb.emit(O.add(a, b)), c])

    mod = _module(body, shape=(1, 32, 6, 6))
    out = cancel_layout_pairs(mod)
    assert _count(mod, "relax.layout_transform") == 3 and _count(out, "relax.layout_transform") == 2
    x = RNG.standard_normal((1, 32, 6, 6)).astype("float32")
    ex = tvm.compile(out, target=tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    blocked = np.maximum(x, 0).reshape(1, 2, 16, 6, 6).transpose(0, 1, 3, 4, 2)
    np.testing.assert_array_equal(got[0].numpy(), 2 * blocked)
    np.testing.assert_array_equal(got[1].numpy(), np.maximum(x, 0).reshape(1, 4, 8, 6, 6).transpose(0, 1, 3, 4, 2))


class PlainReader(nn.Module):
    """The int8 conv's output is also a network output (plain): its boundary keeps the int8 conv's own
    NCHW conversion; the float conv -> int8 conv boundary is blocked all the same."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 16, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(y))), y


def test_a_plain_reader_keeps_the_nchw_route_on_its_side(monkeypatch):
    torch.manual_seed(0)
    builds = _builds(PlainReader(), [1], monkeypatch)
    (old_calls, old_y), (new_calls, new_y) = builds["old"], builds["new"]
    assert old_calls["hago_nchwc_to_nchw"] == 2 and old_calls["te_layout_transform"] == 2, old_calls
    # conv a: its hand-written NCHW conversion as before (the output needs NCHW), into ConvertLayout's transform
    assert new_calls["hago_nchwc_to_nchw"] == 2 and new_calls["te_layout_transform"] == 1, new_calls
    assert new_calls["hago_nchw_to_nchwc"] == 1, new_calls  # conv c reads the float conv's blocks
    np.testing.assert_array_equal(new_y, old_y)
