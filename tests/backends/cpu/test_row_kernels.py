"""Softmax and layer norm as one kernel each (hago/backends/cpu/row_kernels.py) against numpy.

The rewrite must take ``softmax(x * c + mask)`` whole (scale and key mask
fused, the identity ``broadcast_to`` after it dropped), leave what it cannot
take to the op-by-op path, and give the numbers of an exact softmax to
float32 rounding: rows of a power-of-two length (the halving tree), a
length that is not (the pre-fold), a per-batch mask, masked-out keys (-1e4
logits, as BERT writes them) and a 3-d input without scale or mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax import op as O

from hago.backends.cpu.row_kernels import fuse_row_kernels
from hago.build import build_for
from hago.hwspec import HardwareSpec

pytestmark = pytest.mark.llvm


def _module(shape, mask_shape, scale):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    m = None if mask_shape is None else relax.Var("mask", relax.TensorType(mask_shape, "float32"))
    params = [x] if m is None else [x, m]
    with bb.function("main", params):
        with bb.dataflow():
            v = x
            if scale is not None:
                v = bb.emit(O.multiply(v, relax.const(scale, "float32")))
            if m is not None:
                v = bb.emit(O.add(v, m))
            p = bb.emit(O.nn.softmax(v, axis=-1))
            p = bb.emit(O.broadcast_to(p, shape))
            out = bb.emit_output(O.multiply(p, relax.const(1.0, "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _reference(x, mask, scale):
    v = x.astype(np.float64) * (1.0 if scale is None else scale) + (0.0 if mask is None else mask)
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("shape,mask_shape,scale", [
    ((2, 3, 8, 128), (2, 1, 1, 128), 0.125),   # per-batch key mask, power-of-two rows
    ((1, 4, 6, 48), (1, 1, 1, 48), 0.25),      # 48 keys: pre-fold into 16 lanes, then the tree
    ((5, 7, 24), None, None),                   # plain softmax over a 3-d tensor
])
def test_fused_softmax_matches_numpy(shape, mask_shape, scale):
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    mask = None
    if mask_shape is not None:
        mask = np.where(rng.random(mask_shape) < 0.3, -1e4, 0.0).astype(np.float32)
        mask[..., 0] = 0.0  # every row keeps a key
    mod = _module(shape, mask_shape, scale)
    fused = fuse_row_kernels(mod, 16)
    text = fused.script(show_meta=False)
    assert "hago_softmax" in text and "R.nn.softmax" not in text and "R.broadcast_to" not in text
    if scale is not None:
        assert text.count("R.multiply") == 1  # only the trailing one: the scale went into the kernel
    ex = build_for(mod, HardwareSpec.load("x86-avx512-vnni"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(x)] + ([] if mask is None else [tvm.runtime.tensor(mask)])
    got = vm["main"](*args).numpy()
    np.testing.assert_allclose(got, _reference(x, mask, scale), rtol=2e-6, atol=1e-7)
    if mask is not None:
        assert got[np.broadcast_to(mask, shape) < -1].max() < 1e-30  # masked keys get nothing


def test_softmax_the_kernel_cannot_take_stays_an_op():
    """A mask that varies per query is not a key mask: it and the scale before it stay ops."""
    mod = _module((2, 8, 16), (2, 8, 16), 0.5)  # a full mask: not a key mask, stays an add
    text = fuse_row_kernels(mod, 16).script(show_meta=False)
    assert "hago_softmax" in text and "R.add" in text and text.count("R.multiply") == 2  # both stay ops


def test_layer_norm_kernel_matches_numpy():
    """One pass per row (tree sums over 16-lane partials), at BERT's width of 384."""
    shape = (2, 6, 384)
    rng = np.random.default_rng(shape[-1])
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)
    x[..., 7] += 40.0  # one outlier channel, as transformer hidden states have
    gamma = rng.uniform(0.5, 2.0, shape[-1]).astype(np.float32)
    beta = rng.standard_normal(shape[-1]).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(O.nn.layer_norm(xv, relax.const(gamma), relax.const(beta), axes=[-1], epsilon=1e-12))
            out = bb.emit_output(O.add(y, relax.const(0.0, "float32")))
        bb.emit_func_output(out)
    mod = bb.get()
    text = fuse_row_kernels(mod, 16).script(show_meta=False)
    assert "hago_layer_norm" in text and "R.nn.layer_norm" not in text
    got = relax.VirtualMachine(build_for(mod, HardwareSpec.load("x86-avx512-vnni")), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy()
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    want = (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(axis=-1, keepdims=True) + 1e-12) * gamma + beta
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
