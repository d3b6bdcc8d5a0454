"""minmax: exactly numpy's min and max of all batches."""

import numpy as np

from hago.calibrate import MinMaxCalibrator, Range, get_calibrator


def test_minmax_exact_over_batches():
    rng = np.random.default_rng(0)
    cal = get_calibrator("minmax")
    assert isinstance(cal, MinMaxCalibrator)
    batches = [rng.normal(i, 1 + i, size=(3, 5, 7)).astype(np.float32) for i in range(20)]
    for b in batches:
        cal.observe("x", b)
        cal.observe("relu", np.maximum(b, 0))
    cal.observe("ints", np.array([-7, 3, 12], dtype=np.int8))
    data = np.concatenate([b.ravel() for b in batches])
    out = cal.thresholds()
    assert out["x"] == Range(float(data.min()), float(data.max()))
    assert out["relu"] == Range(0.0, float(data.max()))
    assert out["ints"] == Range(-7.0, 12.0)
    sym = cal.thresholds(symmetric=True)
    t = float(np.abs(data).max())
    assert sym["x"] == Range(-t, t)
    assert sym["ints"] == Range(-12.0, 12.0)
    # minmax ignores bits
    assert cal.thresholds(bits=4) == out
    assert cal.stats("x").count == data.size
