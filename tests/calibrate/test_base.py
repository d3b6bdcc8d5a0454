"""Registry, typed options, per-edge bits/symmetry and the errors every calibrator shares."""

import numpy as np
import pytest

from hago.calibrate import (
    CALIBRATORS,
    ZERO_RANGE_EPS,
    Calibrator,
    PercentileConfig,
    Range,
    get_calibrator,
)
from hago.errors import CalibrationError

METHODS = ["minmax", "percentile", "kl", "mse"]


def test_registry_keys_and_names():
    assert set(CALIBRATORS) == set(METHODS)
    for key, cls in CALIBRATORS.items():
        assert cls.name == key
        assert issubclass(cls, Calibrator)
        assert isinstance(get_calibrator(key), cls)


def test_unknown_calibrator_lists_valid_names_on_one_line():
    with pytest.raises(CalibrationError) as info:
        get_calibrator("entropy")
    msg = str(info.value)
    assert "\n" not in msg and "'entropy'" in msg
    for key in METHODS:
        assert key in msg


def test_unknown_or_ill_typed_option():
    with pytest.raises(CalibrationError, match="percentil") as info:
        get_calibrator("percentile", percentil=99.0)
    assert "\n" not in str(info.value) and "valid options: bins, percentile" in str(info.value)
    with pytest.raises(CalibrationError, match="bins"):
        get_calibrator("minmax", bins=128)
    with pytest.raises(CalibrationError, match="bins"):
        get_calibrator("kl", bins="many")
    with pytest.raises(CalibrationError, match="percentile"):
        get_calibrator("percentile", percentile=101.0)
    cal = get_calibrator("percentile", percentile=99.0, bins=512)
    assert cal.config == PercentileConfig(percentile=99.0, bins=512)
    with pytest.raises(Exception):
        cal.config.bins = 3  # frozen
    with pytest.raises(CalibrationError, match="PercentileConfig"):
        CALIBRATORS["percentile"](CALIBRATORS["mse"].config_class())


@pytest.mark.parametrize("method", METHODS)
def test_thresholds_without_data(method):
    cal = get_calibrator(method)
    with pytest.raises(CalibrationError, match="no calibration statistics"):
        cal.thresholds()


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_input_names_the_edge(method):
    cal = get_calibrator(method)
    cal.observe("ok", np.ones(4))
    with pytest.raises(CalibrationError, match="'layer3.relu'"):
        cal.observe("layer3.relu", np.array([[0.5, np.nan]], dtype=np.float32))
    with pytest.raises(CalibrationError, match="'x'"):
        cal.observe("x", np.array([np.inf]))


@pytest.mark.parametrize("method", METHODS)
def test_empty_and_unobserved_edges(method):
    cal = get_calibrator(method)
    cal.observe("a", np.arange(10.0))
    with pytest.raises(CalibrationError, match="'ghost' was never observed"):
        cal.thresholds(bits={"ghost": 8})
    with pytest.raises(CalibrationError, match="'ghost' was never observed"):
        cal.thresholds(symmetric={"ghost": True})
    cal.observe("empty", np.zeros((0, 3)))
    with pytest.raises(CalibrationError, match="'empty' was observed with zero elements"):
        cal.thresholds()


@pytest.mark.parametrize("method", METHODS)
def test_constant_edges_get_nonzero_width(method):
    cal = get_calibrator(method)
    cal.observe("pos", np.full(100, 2.5, dtype=np.float32))
    cal.observe("neg", np.full(100, -1.5))
    cal.observe("zero", np.zeros(100))
    asym = cal.thresholds()
    assert asym["pos"] == Range(0.0, 2.5)
    assert asym["neg"] == Range(-1.5, 0.0)
    assert asym["zero"] == Range(0.0, ZERO_RANGE_EPS)
    sym = cal.thresholds(symmetric=True)
    assert sym["pos"] == Range(-2.5, 2.5)
    assert sym["zero"] == Range(-ZERO_RANGE_EPS, ZERO_RANGE_EPS)


@pytest.mark.parametrize("method", METHODS)
def test_per_edge_bits_and_symmetry(method):
    rng = np.random.default_rng(0)
    cal = get_calibrator(method)
    for _ in range(4):
        cal.observe("a", rng.normal(0.5, 1.0, size=5000))
        cal.observe("b", rng.normal(0.5, 1.0, size=5000))
    out = cal.thresholds(bits={"a": 8}, symmetric={"a": True})
    assert out["a"].lo == -out["a"].hi
    assert out["b"].lo != -out["b"].hi  # default: asymmetric
    assert out["b"] == cal.thresholds(bits=8, symmetric=False)["b"]
    with pytest.raises(CalibrationError, match="bits=1"):
        cal.thresholds(bits=1)
    with pytest.raises(CalibrationError, match="bits"):
        cal.thresholds(bits={"a": 8.0})
    with pytest.raises(CalibrationError, match="symmetric"):
        cal.thresholds(symmetric="yes")


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_resumes_calibration(method):
    rng = np.random.default_rng(1)
    batches = [rng.standard_t(4, size=3000) * (1 + i) for i in range(6)]
    whole = get_calibrator(method, **({} if method == "minmax" else {"bins": 256}))
    first = get_calibrator(method, **({} if method == "minmax" else {"bins": 256}))
    for b in batches:
        whole.observe("e", b)
    for b in batches[:3]:
        first.observe("e", b)
    resumed = get_calibrator(method, **({} if method == "minmax" else {"bins": 256}))
    resumed.load_state_dict(first.state_dict())
    for b in batches[3:]:
        resumed.observe("e", b)
    assert resumed.thresholds(bits=6) == whole.thresholds(bits=6)
    other = "kl" if method != "kl" else "mse"
    with pytest.raises(CalibrationError, match="saved state"):
        get_calibrator(other).load_state_dict(first.state_dict())


def test_range_validation_and_with_zero():
    assert Range(1.0, 2.0).with_zero() == Range(0.0, 2.0)
    assert Range(-3.0, -1.0).with_zero() == Range(-3.0, 0.0)
    assert type(Range(np.float32(1.0), np.float64(2.0)).lo) is float
    with pytest.raises(CalibrationError):
        Range(2.0, 1.0)
    with pytest.raises(CalibrationError):
        Range(0.0, float("nan"))
