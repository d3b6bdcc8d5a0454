"""The narrow bf16 stem on the AMX tiles (hago/backends/amx/stem_bf16.py) against a float64 reference.

Inputs and weights are rounded to bf16 (nearest even) for the reference;
products of bf16 values are exact in fp32, so outputs may differ only by
the fp32 summation: the tolerance is ``1e-5 * conv(|x|, |w|)`` per output.
Cases: a 3x3 stride-1 stem with an output count that is not a multiple of
16, and a 7x7 stride-2 stem (ResNet's) with asymmetric padding and batch 2.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from hago.backends.amx.permission import amx_available
from hago.backends.amx.stem_bf16 import bf16_taps_applicable, emit_conv2d_amx_bf16_taps
from hago.build import build_for
from hago.hwspec import HardwareSpec

pytestmark = pytest.mark.skipif(amx_available() is not None, reason=str(amx_available()))


def _bf16(a):
    return a.astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("shape,wshape,strides,padding", [
    ((1, 3, 20, 18), (20, 3, 3, 3), (1, 1), (1, 1, 1, 1)),
    ((2, 3, 23, 21), (32, 3, 7, 7), (2, 2), (3, 2, 2, 3)),
])
def test_bf16_stem_matches_the_rounded_reference(shape, wshape, strides, padding):
    rng = np.random.default_rng(shape[2])
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal(wshape) * 0.2).astype(np.float32)
    bias = rng.standard_normal(wshape[0]).astype(np.float32)
    assert bf16_taps_applicable(shape, wshape, strides, (1, 1), 1)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(emit_conv2d_amx_bf16_taps(bb, xv, w, strides, padding, bias=bias))
        bb.emit_func_output(out)
    ex = build_for(bb.get(), HardwareSpec.load("x86-amx"))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    n, ob, oh, ow, lanes = got.shape
    got = got.transpose(0, 1, 4, 2, 3).reshape(n, ob * lanes, oh, ow)
    top, left, bottom, right = padding

    def conv(a, k):
        a = torch.nn.functional.pad(torch.from_numpy(a), (left, right, top, bottom))
        return torch.nn.functional.conv2d(a, torch.from_numpy(k), stride=strides).numpy()

    ref = conv(_bf16(x), _bf16(w)) + bias[:, None, None]
    bound = conv(np.abs(_bf16(x)), np.abs(_bf16(w))) + np.abs(bias)[:, None, None]
    assert got.shape[1] == -(-wshape[0] // 16) * 16 and ref.shape == got[:, :wshape[0]].shape
    assert (np.abs(got[:, :wshape[0]] - ref) <= 1e-5 * bound).all()
    assert (got[:, wshape[0]:] == 0).all()  # output channels past O: zero weights, zero bias
