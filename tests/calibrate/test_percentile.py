"""percentile: within one histogram bin of np.percentile on the concatenated data."""

import numpy as np
import pytest

from hago.calibrate import get_calibrator


@pytest.mark.parametrize("p", [99.99, 99.9, 99.0, 90.0])
def test_percentile_matches_numpy_within_one_bin(p):
    rng = np.random.default_rng(7)
    batches = [rng.standard_t(df=4, size=10000).astype(np.float32) * (1 + 0.1 * i) + 0.3 for i in range(10)]
    cal = get_calibrator("percentile", percentile=p)
    for b in batches:
        cal.observe("e", b)
    data = np.concatenate(batches).astype(np.float64)
    width = cal.stats("e").bin_width
    rng_ = cal.thresholds()["e"]
    assert abs(rng_.hi - np.percentile(data, p)) <= width
    assert abs(rng_.lo - np.percentile(data, 100 - p)) <= width
    t = cal.thresholds(symmetric=True)["e"]
    assert t.lo == -t.hi
    assert abs(t.hi - np.percentile(np.abs(data), p)) <= width
    # The clip is real: the percentile is inside the observed range.
    assert data.min() < rng_.lo < rng_.hi < data.max()


def test_percentile_100_is_minmax_and_relu_clips_only_top():
    rng = np.random.default_rng(8)
    data = np.maximum(rng.normal(size=50000), 0)
    full = get_calibrator("percentile", percentile=100.0)
    full.observe("r", data)
    assert full.thresholds()["r"].hi == data.max()
    cal = get_calibrator("percentile", percentile=99.0)
    cal.observe("r", data)
    out = cal.thresholds()["r"]
    assert 0.0 <= out.lo <= cal.stats("r").bin_width
    assert abs(out.hi - np.percentile(data, 99.0)) <= cal.stats("r").bin_width
