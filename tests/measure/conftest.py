"""Fixtures of the measurement tests: a small MNIST calibration/evaluation pair on disk."""

from __future__ import annotations

import numpy as np
import pytest

from hago import zoo


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, mnist_test):
    """``(calib.npz, eval.npz)``: 64 validation images, 60 labelled test images."""
    xv, _ = zoo.mnist_data("valid")
    x, y = mnist_test
    d = tmp_path_factory.mktemp("measure_data")
    np.savez(d / "calib.npz", input=xv[:64])
    np.savez(d / "eval.npz", input=x[:60], label=y[:60])
    return d / "calib.npz", d / "eval.npz"
