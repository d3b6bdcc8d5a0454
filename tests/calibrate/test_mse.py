"""mse: the picked range's simulated quantization error beats other ranges on the real data."""

import numpy as np
import pytest

from hago.calibrate import get_calibrator
from hago.calibrate.mse import (
    _cum_error,
    asymmetric_grid,
    expected_sq_error,
    symmetric_grid,
)


# NumPy fake-quantizers that score ranges on the real data (round to nearest, clip).
def fake_quant_symmetric(x: np.ndarray, t: float, bits: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    s = t / qmax
    return np.clip(np.round(x / s), -qmax, qmax) * s


def fake_quant_asymmetric(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2**bits - 1
    s = (hi - lo) / levels
    zp = np.round(-lo / s)
    return (np.clip(np.round(x / s) + zp, 0, levels) - zp) * s


def mse_symmetric(x: np.ndarray, t: float, bits: int) -> float:
    return float(np.mean((x - fake_quant_symmetric(x, t, bits)) ** 2))


def mse_asymmetric(x: np.ndarray, lo: float, hi: float, bits: int) -> float:
    return float(np.mean((x - fake_quant_asymmetric(x, lo, hi, bits)) ** 2))


def _calibrated(data, name="x", batches=8, **options):
    cal = get_calibrator("mse", **options)
    for chunk in np.array_split(data, batches):
        cal.observe(name, chunk)
    return cal


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_choice_beats_minmax_and_other_thresholds(bits):
    rng = np.random.default_rng(0)
    data = rng.laplace(size=100_000)
    t = _calibrated(data).thresholds(bits=bits, symmetric=True)["x"].hi
    maxabs = float(np.abs(data).max())
    best = mse_symmetric(data, t, bits)
    others = [maxabs, 0.5 * t, 0.75 * t, 1.3 * t, 0.5 * maxabs]
    for other in others:
        assert best <= mse_symmetric(data, other, bits), other
    assert t < maxabs


@pytest.mark.parametrize("bits", [8, 4])
def test_asymmetric_choice_beats_minmax_and_other_ranges(bits):
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.gamma(2.0, 1.0, size=60_000) - 1.0, [-6.0, 30.0]])
    out = _calibrated(data).thresholds(bits=bits)["x"]
    best = mse_asymmetric(data, out.lo, out.hi, bits)
    lo, hi = float(data.min()), float(data.max())
    for other in [(lo, hi), (out.lo, 0.7 * out.hi), (out.lo, 1.4 * out.hi), (0.5 * out.lo, out.hi),
                  (0.6 * lo, 0.6 * hi)]:
        assert best <= mse_asymmetric(data, *other, bits), other
    assert out.hi < hi


def test_uniform_data_picks_about_the_max():
    rng = np.random.default_rng(2)
    data = rng.uniform(-1.0, 1.0, size=100_000)
    cal = _calibrated(data)
    t = cal.thresholds(bits=8, symmetric=True)["x"].hi
    assert t >= 0.98 * np.abs(data).max()
    relu = np.maximum(data, 0.0)
    cal.observe("relu", relu)
    out = cal.thresholds(bits=8)["relu"]
    assert out.lo == 0.0 and out.hi >= 0.98 * relu.max()


def test_fewer_bits_clip_tighter():
    rng = np.random.default_rng(3)
    data = rng.normal(size=100_000)
    cal = _calibrated(data)
    t8 = cal.thresholds(bits={"x": 8}, symmetric=True)["x"].hi
    t4 = cal.thresholds(bits={"x": 4}, symmetric=True)["x"].hi
    t2 = cal.thresholds(bits={"x": 2}, symmetric=True)["x"].hi
    assert t2 < t4 < t8
    # Known optima for a unit Gaussian (Banner et al. 2019, table 1): about 2.55 at 4 bits.
    assert 2.2 < t4 < 2.9


def test_histogram_error_model_matches_simulation():
    rng = np.random.default_rng(4)
    data = np.concatenate([np.maximum(rng.normal(size=50_000), 0.0), rng.normal(size=50_000)])
    cal = _calibrated(data)
    hist = cal.stats("x")
    for bits in (8, 4):
        ts = np.array([0.5, 1.5, 3.0, float(np.abs(data).max())])
        model = expected_sq_error(hist.edges, hist.counts, *symmetric_grid(ts, bits), hist.zeros) / data.size
        actual = [mse_symmetric(data, t, bits) for t in ts]
        np.testing.assert_allclose(model, actual, rtol=0.01)
        los, his = np.array([-1.0, -2.0, -4.0]), np.array([4.0, 2.0, 1.0])
        model = expected_sq_error(hist.edges, hist.counts, *asymmetric_grid(los, his, bits), hist.zeros) / data.size
        actual = [mse_asymmetric(data, lo, hi, bits) for lo, hi in zip(los, his)]
        np.testing.assert_allclose(model, actual, rtol=0.01)


def test_cumulative_error_is_the_integral_of_the_squared_error():
    s, lo, hi = np.array([[0.3]]), np.array([[-0.9]]), np.array([[1.2]])
    grid = np.linspace(-2.0, 2.5, 400_001)
    err = (grid - np.clip(np.round(grid / 0.3) * 0.3, -0.9, 1.2)) ** 2
    numeric = np.concatenate(([0.0], np.cumsum((err[1:] + err[:-1]) / 2 * np.diff(grid))))
    numeric -= np.interp(0.0, grid, numeric)
    for x in (-2.0, -0.95, -0.1, 0.0, 0.44, 1.2, 2.5):
        closed = float(_cum_error(np.array([x]), s, lo, hi)[0, 0])
        assert closed == pytest.approx(float(np.interp(x, grid, numeric)), abs=1e-6), x


def test_mse_options_validated():
    assert get_calibrator("mse", candidates=50, rounds=3).config.candidates == 50
    from hago.errors import CalibrationError

    with pytest.raises(CalibrationError, match="candidates"):
        get_calibrator("mse", candidates=3)
