"""The simulated (fake-quant) graph tracks the realized integer program."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hago.compiler import quantize
from hago.simulate import simulate

pytestmark = pytest.mark.llvm


def test_simulated_mnist_agrees_with_realized(mnist_model, mnist_test, mnist_ref, run_tvm):
    x, y = mnist_test
    q = quantize(mnist_model, "x86-avx512-vnni", {"input": x[-500:]}, example_inputs=(torch.from_numpy(x[:2]),),
                 corrections=())  # the twin is what is checked (corrections have their own twin tests)
    sim = simulate(q.graph, q.strategy)
    assert sim.script(show_meta=False).count("R.quantize(") == 4  # input + three calibrated edges
    xs, fp32 = mnist_ref  # the first 1000 test images and torch's FP32 logits (TVM's FP32 build is within 1e-4)
    assert len(xs) == 1000 and np.array_equal(xs, x[:1000])
    fake, real = run_tvm(sim, xs), run_tvm(q.realized.mod, xs)
    assert (fake.argmax(1) == real.argmax(1)).mean() >= 0.998
    # the simulation is much closer to the integer program than FP32 is
    assert np.abs(fake - real).mean() < 0.5 * np.abs(fp32 - real).mean()
