"""The one-kernel per-row quantize (hago/backends/cpu/row_quantize.py) against the Relax-op version.

Both are built and run here; codes, scales and zero points must be
identical, on rows that exercise every branch: all zero (scale 1), all
positive and all negative (0 is clamped into the range), heavy outliers,
a row length the vector width does not divide (the scalar path), and 4, 2
or 1 independent min/max chains.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from hago import dynamic
from hago.build import build_for
from hago.hwspec import HardwareSpec
from hago.backends.cpu.row_quantize import emit_row_quantize

pytestmark = pytest.mark.llvm


def _run(shape, emit, x):
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            q, scale, zp = emit(bb, xv)
            out = bb.emit_output(relax.Tuple([q, scale, zp]))
        bb.emit_func_output(out)
    ex = build_for(bb.get(), HardwareSpec.load("x86-avx512-vnni"))
    res = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return [res[i].numpy() for i in range(3)]


def _rows(rng, shape):
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 5.0, size=(*shape[:-1], 1))).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0] = 0.0
    flat[1] = np.abs(flat[1]) + 0.5
    flat[2] = -np.abs(flat[2]) - 0.5
    flat[3, 5] = 400.0
    return x


@pytest.mark.parametrize("shape,lanes", [((6, 64), 16), ((4, 96), 16), ((2, 4, 40), 16), ((5, 48), 4)])
def test_one_kernel_row_quantize_is_bit_identical_to_the_relax_ops(shape, lanes):
    x = _rows(np.random.default_rng(sum(shape)), shape)
    got = _run(shape, lambda bb, v: emit_row_quantize(bb, v, lanes), x)
    want = _run(shape, dynamic.emit_row_quantize, x)
    for g, w, name in zip(got, want, ("q", "scale", "zp")):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)
    q, scale, zp = got
    assert scale.reshape(-1)[0] == 1.0 and zp.reshape(-1)[0] == 0  # the all-zero row
    assert zp.reshape(-1)[1] == 0 and zp.reshape(-1)[2] == 255  # 0 kept exact at either end
    assert q.max() == 255 and q.min() == 0
