"""Fixtures of the search-state tests: small MNIST data and a cheap engine factory."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from hago import zoo


@pytest.fixture(scope="module")
def small_data(mnist_test):
    """``(calib, eval)`` dicts: 64 validation images, 60 labelled test images (an engine builds in ~3 s)."""
    xv, _ = zoo.mnist_data("valid")
    x, y = mnist_test
    return {"input": xv[:64]}, {"input": x[:60], "label": y[:60]}


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, small_data):
    d = tmp_path_factory.mktemp("search_state_data")
    np.savez(d / "calib.npz", **small_data[0])
    np.savez(d / "eval.npz", **small_data[1])
    return d / "calib.npz", d / "eval.npz"


class Evil:
    """Unpickling this creates ``marker``: the proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture
def evil_pickle(tmp_path):
    """``(bytes, marker)``: a pickle that creates the file ``marker`` when loaded (it references only
    ``builtins.exec``); checked here to work, so a test that never sees ``marker`` proves it was not loaded."""
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(Evil(control)))
    assert control.exists(), "the planted pickle would not run: the no-unpickling tests could not fail"
    marker = tmp_path / "PWNED"
    return pickle.dumps(Evil(marker)), marker
