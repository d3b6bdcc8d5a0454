"""Fixtures of the search-state tests: small MNIST data, and its reference cache computed once."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from hago import zoo


@pytest.fixture(scope="session")
def small_data(mnist_test):
    """``(calib, eval)`` dicts: 64 validation images, 60 labelled test images (an engine builds in ~3 s)."""
    xv, _ = zoo.mnist_data("valid")
    x, y = mnist_test
    return {"input": xv[:64]}, {"input": x[:60], "label": y[:60]}


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory, small_data):
    d = tmp_path_factory.mktemp("search_state_data")
    np.savez(d / "calib.npz", **small_data[0])
    np.savez(d / "eval.npz", **small_data[1])
    return d / "calib.npz", d / "eval.npz"


def reference_dir(onnx, data, cache: Path) -> Path:
    """Compute an engine's reference cache (calibration statistics, ``bias`` corrections, FP32 outputs) for
    ``data`` into ``cache``; return its ``reference`` folder, checked to hold exactly those three files."""
    from hago.search.engine import SearchEngine

    SearchEngine(onnx, "x86-avx512-vnni", data[0], data[1], log_path=cache / "reference.jsonl", cache_dir=cache,
                 max_trials=1)
    ref = cache / "reference"
    assert sorted(p.name.split("-")[0] for p in ref.iterdir()) == ["calib", "corrections", "fp32"]
    return ref


def warm_copy(reference: Path, cache: Path) -> Path:
    """``cache`` (a new folder) holding a copy of ``reference`` and nothing else: no kernel timings."""
    shutil.copytree(reference, cache / "reference")
    return cache


@pytest.fixture(scope="session")
def small_reference(tmp_path_factory, mnist_onnx_path, small_data):
    """The reference cache of ``small_data``, computed once: tests that are not about computing it start from
    a copy (``warm_cache``) instead of spending seconds on calibration, corrections and FP32 each."""
    return reference_dir(mnist_onnx_path, small_data, tmp_path_factory.mktemp("small_reference"))


@pytest.fixture
def warm_cache(tmp_path, small_reference):
    """A fresh cache folder for this test, holding a copy of ``small_data``'s reference cache."""
    return warm_copy(small_reference, tmp_path / "cache")


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
