"""kl: TensorRT entropy calibration, checked against a plain-Python re-implementation."""

import math

import numpy as np
import pytest

from hago.calibrate import get_calibrator
from hago.calibrate.kl import kl_divergences


def mse_symmetric(x, t, bits):
    """Mean squared error of symmetric round-to-nearest fake quantization with threshold t."""
    qmax = 2 ** (bits - 1) - 1
    s = t / qmax
    return float(np.mean((x - np.clip(np.round(x / s), -qmax, qmax) * s) ** 2))


def _gaussian_with_outliers(seed=0, n=200_000):
    rng = np.random.default_rng(seed)
    bulk = rng.normal(size=n).astype(np.float32)
    outliers = np.array([60.0, -75.0, 90.0, 55.0, -100.0, 70.0], dtype=np.float32)
    return bulk, outliers


def _brute_force_threshold(counts, edges, levels, eps=1e-4):
    """MXNet's ``_get_optimal_threshold`` written out with loops, on a |x| histogram."""

    def smooth(dist):
        n_zeros = sum(1 for v in dist if v == 0)
        n_nonzeros = len(dist) - n_zeros
        if n_nonzeros == 0:
            return None
        eps1 = eps * n_zeros / n_nonzeros
        out = [v + eps if v == 0 else v - eps1 for v in dist]
        return out if min(out) > 0 else None

    counts = [int(c) for c in counts]
    best_kl, best_i = math.inf, None
    divergences = []
    for i in range(levels, len(counts) + 1):
        p = [float(c) for c in counts[:i]]
        p[-1] += sum(counts[i:])
        m = i // levels
        q = [0.0] * i
        for j in range(levels):
            start, stop = j * m, (i if j == levels - 1 else (j + 1) * m)
            total = sum(counts[start:stop])
            nonzero = [t for t in range(start, stop) if p[t] != 0]
            for t in nonzero:
                q[t] = total / len(nonzero)
        ps, qs = smooth(p), smooth(q)
        if ps is None or qs is None:
            divergences.append(math.inf)
            continue
        sp, sq = sum(ps), sum(qs)
        kl = sum(a / sp * math.log((a / sp) / (b / sq)) for a, b in zip(ps, qs))
        divergences.append(kl)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return edges[best_i], np.array(divergences)


def _observe(cal, name, data, batches=10):
    for chunk in np.array_split(data, batches):
        cal.observe(name, chunk)


def test_kl_clips_outliers_and_beats_minmax_on_the_bulk():
    bulk, outliers = _gaussian_with_outliers()
    data = np.concatenate([bulk, outliers])
    np.random.default_rng(1).shuffle(data)
    kl = get_calibrator("kl")
    _observe(kl, "x", data)
    t = kl.thresholds(symmetric=True)["x"].hi
    maxabs = float(np.abs(data).max())
    assert t < 0.5 * maxabs
    assert mse_symmetric(bulk, t, 8) < 0.25 * mse_symmetric(bulk, maxabs, 8)
    t4 = kl.thresholds(bits=4, symmetric=True)["x"].hi
    assert t4 < t and t4 < 5.0
    assert mse_symmetric(bulk, t4, 4) < mse_symmetric(bulk, maxabs, 4)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_kl_matches_brute_force_on_the_same_histogram(bits):
    rng = np.random.default_rng(2)
    data = np.concatenate([rng.laplace(size=50_000), [25.0, -30.0]])
    kl = get_calibrator("kl", bins=1024)
    _observe(kl, "x", data)
    edges, counts = kl.stats("x").abs_histogram()
    # The |x| histogram is taken straight from the data, not from the calibrator's folding.
    independent, _ = np.histogram(np.abs(data), bins=edges)
    levels = 2 ** (bits - 1)
    expected, expected_divs = _brute_force_threshold(independent, edges, levels)
    np.testing.assert_allclose(kl_divergences(counts, levels), expected_divs, rtol=1e-9)
    assert kl.thresholds(bits=bits, symmetric=True)["x"].hi == pytest.approx(expected)


def test_kl_asymmetric_one_signed_data_uses_2_pow_bits_levels():
    rng = np.random.default_rng(3)
    data = np.maximum(rng.normal(size=60_000), 0.0)
    data[:3] = [6.0, 7.0, 8.0]
    kl = get_calibrator("kl", bins=512)
    _observe(kl, "relu", data)
    edges, counts = kl.stats("relu").abs_histogram()
    asym, _ = _brute_force_threshold(counts, edges, 2**6)
    sym, _ = _brute_force_threshold(counts, edges, 2**5)
    out = kl.thresholds(bits=6)["relu"]
    assert out.lo == 0.0
    assert out.hi == pytest.approx(min(asym, 8.0)) and out.hi < 8.0
    assert kl.thresholds(bits=6, symmetric=True)["relu"].hi == pytest.approx(sym)
    assert sym < out.hi  # half the levels per side: a tighter clip


def test_kl_asymmetric_mixed_sign_clips_to_observed_range():
    rng = np.random.default_rng(4)
    data = np.concatenate([rng.normal(size=80_000), [40.0, 45.0, 50.0]])  # one-sided outliers
    kl = get_calibrator("kl")
    _observe(kl, "x", data)
    t = kl.thresholds(symmetric=True)["x"].hi
    out = kl.thresholds(symmetric=False)["x"]
    assert t < 50.0
    assert out.hi == t
    assert out.lo == max(-t, float(data.min()))


def test_kl_too_few_bins_for_levels_does_not_clip():
    rng = np.random.default_rng(5)
    data = rng.normal(size=10_000)
    kl = get_calibrator("kl", bins=64)
    kl.observe("x", data)
    out = kl.thresholds(bits=8, symmetric=True)["x"]
    assert out.hi == pytest.approx(np.abs(data).max())
