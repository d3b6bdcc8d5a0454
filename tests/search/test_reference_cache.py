"""The search's reference caches are data, never pickles: planted pickles never run, the cache round-trips."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from hago.search import engine as engine_mod
from hago.search import refcache
from hago.search.engine import SearchEngine
from hago.measure import LocalMeasurer

pytestmark = pytest.mark.llvm


def _engine(onnx, data, tmp_path, cache, name="s.jsonl"):
    return SearchEngine(onnx, "x86-avx512-vnni", data[0], data[1], log_path=tmp_path / name, cache_dir=cache,
                        measurer=LocalMeasurer(timeout_s=30), max_trials=1)


def _state(e) -> str:
    """What the caches decide: the widest candidate's ranges, scales and bias deltas, as JSON."""
    return json.dumps(e.strategy(e.space.widest()).to_json(), sort_keys=True)


def _forbid_recompute(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("recomputed although the cache was valid")

    monkeypatch.setattr(engine_mod, "observe", fail)
    monkeypatch.setattr(engine_mod, "run_corrections", fail)
    monkeypatch.setattr(engine_mod, "predict", fail)  # the FP32 reference outputs


def test_planted_pickles_never_run_and_results_stay_correct(mnist_onnx_path, small_data, tmp_path, evil_pickle,
                                                           caplog, warm_cache):
    payload, marker = evil_pickle
    cache = warm_cache  # valid files to plant over (computing them is test_cache_round_trips_identically's)
    first = _engine(mnist_onnx_path, small_data, tmp_path, cache, "a.jsonl")
    expected = _state(first)
    ref = cache / "reference"
    calib = next(ref.glob("calib-*.npz"))
    corr = next(ref.glob("corrections-bias-*.json"))
    fp32 = next(ref.glob("fp32-*.npz"))
    assert first.strategy(first.space.widest()).ops and "bias_delta" in expected
    # where older hago kept them (it would unpickle these), and under the new names
    for path in (calib.with_suffix(".pkl"), corr.with_suffix(".pkl"), fp32.with_suffix(".npy"), calib, corr, fp32):
        path.write_bytes(payload)
    caplog.set_level(logging.WARNING)
    second = _engine(mnist_onnx_path, small_data, tmp_path, cache, "b.jsonl")
    assert not marker.exists(), "a planted pickle was loaded"
    assert _state(second) == expected
    assert sum("ignoring cache" in r.getMessage() for r in caplog.records) == 3
    assert not any(".pkl" in r.getMessage() or ".npy" in r.getMessage() for r in caplog.records)  # the old files are not even opened

    # an npz whose array holds the pickled object: numpy refuses the object array, nothing runs
    np.savez(calib, __meta__=np.array([_Holder(payload)], dtype=object))
    third = _engine(mnist_onnx_path, small_data, tmp_path, cache, "c.jsonl")
    assert not marker.exists()
    assert _state(third) == expected
    # the recomputed files are valid data again
    assert refcache.load_npz(calib, "calibration", {"digest": calib.stem[6:], "graph_hash": third.ghash,
                                                    "calibrator": "mse"}) is not None


class _Holder:
    """Pickles as the planted payload (so np.savez embeds it in an object array)."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def __reduce__(self):
        import pickle

        return pickle.loads, (self.payload,)


def test_cache_round_trips_identically(mnist_onnx_path, small_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _engine(mnist_onnx_path, small_data, tmp_path, cache, "a.jsonl")
    names = sorted(p.name for p in (cache / "reference").iterdir())
    assert [n.split("-")[0] for n in names] == ["calib", "corrections", "fp32"]
    assert not any(n.endswith(".pkl") for n in names)
    meta = json.loads((cache / "reference" / names[1]).read_text())
    assert (meta["schema"], meta["version"], meta["kind"]) == (refcache.SCHEMA, refcache.VERSION, "corrections")
    _forbid_recompute(monkeypatch)
    second = _engine(mnist_onnx_path, small_data, tmp_path, cache, "b.jsonl")
    assert _state(second) == _state(first)
    assert second.calibrator.state_dict().keys() == first.calibrator.state_dict().keys()
    for edge, st in first.calibrator.state_dict()["edges"].items():
        np.testing.assert_array_equal(second.calibrator.state_dict()["edges"][edge]["counts"], st["counts"])
    assert second._corrected == first._corrected
    assert second.fp32_score == first.fp32_score


@pytest.mark.parametrize("damage", ["other_version", "other_key", "truncated", "not_a_layer"])
def test_stale_or_malformed_cache_is_recomputed(mnist_onnx_path, small_data, tmp_path, damage, caplog, warm_cache):
    cache = warm_cache
    expected = _state(_engine(mnist_onnx_path, small_data, tmp_path, cache, "a.jsonl"))
    ref = cache / "reference"
    calib, corr = next(ref.glob("calib-*.npz")), next(ref.glob("corrections-*.json"))
    meta = json.loads(corr.read_text())
    if damage == "other_version":
        meta["version"] = refcache.VERSION + 1
        corr.write_text(json.dumps(meta))
    elif damage == "other_key":
        meta["key"]["graph_hash"] = "0" * 16
        corr.write_text(json.dumps(meta))
    elif damage == "truncated":
        calib.write_bytes(calib.read_bytes()[:200])
        corr.write_text(corr.read_text()[:50])
    else:
        meta["data"]["layers"] = {"conv": {"weight_bits": "8", "input_bits": 8, "input_dynamic": False}}
        corr.write_text(json.dumps(meta))
    caplog.set_level(logging.WARNING)
    again = _engine(mnist_onnx_path, small_data, tmp_path, cache, "b.jsonl")
    assert _state(again) == expected
    assert any("ignoring cache" in r.getMessage() for r in caplog.records)
    assert json.loads(corr.read_text())["version"] == refcache.VERSION  # rewritten


def test_refcache_refuses_non_data(tmp_path, evil_pickle):
    payload, marker = evil_pickle
    key = {"digest": "d"}
    refcache.save_npz(tmp_path / "ok.npz", "calibration", key, {"a": np.arange(4, dtype=np.int64), "b": [1.5, None]})
    got = refcache.load_npz(tmp_path / "ok.npz", "calibration", key)
    np.testing.assert_array_equal(got["a"], np.arange(4))
    assert got["a"].dtype == np.int64 and got["b"] == [1.5, None]
    assert refcache.load_npz(tmp_path / "ok.npz", "corrections", key) is None  # another kind
    assert refcache.load_npz(tmp_path / "ok.npz", "calibration", {"digest": "e"}) is None  # another key
    for name in ("p.npz", "p.json"):
        (tmp_path / name).write_bytes(payload)
    assert refcache.load_npz(tmp_path / "p.npz", "calibration", key) is None
    assert refcache.load_json(tmp_path / "p.json", "calibration", key) is None
    assert not marker.exists()
    with pytest.raises(TypeError, match="cannot cache"):
        refcache.save_json(tmp_path / "x.json", "k", key, {"x": object()})
