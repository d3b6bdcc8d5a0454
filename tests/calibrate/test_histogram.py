"""StreamingHistogram: exact against numpy on the concatenated data, bounded memory."""

import numpy as np
import pytest

from hago.calibrate import StreamingHistogram, histogram_quantile
from hago.errors import CalibrationError


def _stream(batches, bins=256):
    hist = StreamingHistogram(bins, name="edge")
    for batch in batches:
        hist.update(batch)
    return hist


def test_streaming_equals_numpy_histogram_of_concatenated_data():
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=0.1 * i, scale=1 + i, size=(7, 13)).astype(np.float32) for i in range(50)]
    hist = _stream(batches)
    data = np.concatenate([b.ravel() for b in batches])
    expected, _ = np.histogram(data, bins=hist.edges)
    np.testing.assert_array_equal(hist.counts, expected)
    assert hist.count == data.size == hist.counts.sum()
    assert hist.min == data.min() and hist.max == data.max()
    assert hist.edges[0] <= data.min() and data.max() < hist.edges[-1]


def test_bounded_memory_over_1000_batches_of_growing_range():
    rng = np.random.default_rng(1)
    hist = StreamingHistogram(512, name="grow")
    batches = []
    for i in range(1000):
        batch = rng.uniform(-1.0, 1.0, size=100) * 1.01**i + 0.5 * i  # range and offset grow
        hist.update(batch)
        batches.append(batch)
        assert hist.counts.shape == (512,)
    state = hist.state_dict()
    assert state["counts"].nbytes == 512 * 8
    data = np.concatenate(batches)
    expected, _ = np.histogram(data, bins=hist.edges)
    np.testing.assert_array_equal(hist.counts, expected)
    assert hist.counts.sum() == 100_000
    # Power-of-two widths: the data spans at least half of the bins.
    assert (data.max() - data.min()) / hist.bin_width >= 512 / 2 - 2


def test_narrow_first_batch_then_wide_batch_merges_exactly():
    rng = np.random.default_rng(2)
    first = rng.normal(scale=1e-3, size=1000)
    second = rng.normal(loc=-5e3, scale=1e3, size=1000)
    hist = _stream([first, second], bins=128)
    expected, _ = np.histogram(np.concatenate([first, second]), bins=hist.edges)
    np.testing.assert_array_equal(hist.counts, expected)


def test_constant_then_spread_and_integer_input():
    hist = _stream([np.full(10, 3.0), np.zeros(4), np.arange(-20, 21)], bins=64)
    data = np.concatenate([np.full(10, 3.0), np.zeros(4), np.arange(-20, 21)])
    expected, _ = np.histogram(data, bins=hist.edges)
    np.testing.assert_array_equal(hist.counts, expected)
    assert hist.bin_width > 0


def test_abs_histogram_folds_exactly():
    rng = np.random.default_rng(3)
    data = np.concatenate([rng.normal(size=5000), rng.normal(2.0, 3.0, size=5000)])
    hist = _stream(np.split(data, 10), bins=300)
    edges, counts = hist.abs_histogram()
    assert edges[0] == 0.0 and edges[-1] > np.abs(data).max()
    expected, _ = np.histogram(np.abs(data), bins=edges)
    np.testing.assert_array_equal(counts, expected)


def test_quantile_within_one_bin_of_numpy():
    rng = np.random.default_rng(4)
    data = rng.standard_t(df=5, size=20000)
    hist = _stream(np.split(data, 20), bins=1024)
    for q in (0.1, 1.0, 25.0, 50.0, 90.0, 99.0, 99.9):
        got = histogram_quantile(hist.edges, hist.counts, q)
        assert abs(got - np.percentile(data, q)) <= hist.bin_width, q


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_edge(bad):
    hist = StreamingHistogram(64, name="conv1.out")
    with pytest.raises(CalibrationError, match="conv1.out"):
        hist.update(np.array([1.0, bad, 2.0]))
    assert hist.count == 0 and hist.counts.sum() == 0


def test_empty_batch_is_a_no_op_and_state_round_trips():
    rng = np.random.default_rng(5)
    hist = _stream([rng.normal(size=100), np.array([]), rng.normal(size=50) * 9], bins=64)
    assert hist.count == 150
    copy = StreamingHistogram(64, name="edge")
    copy.load_state_dict(hist.state_dict())
    extra = rng.normal(size=30) * 100
    hist.update(extra)
    copy.update(extra)
    np.testing.assert_array_equal(copy.counts, hist.counts)
    np.testing.assert_array_equal(copy.edges, hist.edges)
    with pytest.raises(CalibrationError, match="bins"):
        StreamingHistogram(32).load_state_dict(hist.state_dict())


def test_counts_are_read_only_and_bins_validated():
    hist = _stream([np.arange(10.0)], bins=16)
    with pytest.raises(ValueError):
        hist.counts[0] = 5
    with pytest.raises(CalibrationError):
        StreamingHistogram(2)
    with pytest.raises(CalibrationError, match="dtype"):
        hist.update(np.array([1 + 2j]))
