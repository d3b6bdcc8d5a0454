"""The contenders for the answer are re-timed side by side, so a drifting machine cannot pick it (hago.search.settle)."""

from __future__ import annotations

import functools
import json

import pytest

from hago.measure import Measurement
from hago.search.algorithms import ALGORITHMS
from hago.search.engine import SearchEngine
from hago.search.target import SearchError

from .test_engine import KernelSumMeasurer

pytestmark = [pytest.mark.llvm, pytest.mark.slow]
EVOLVE = functools.partial(ALGORITHMS["evolve"], population=4, rounds=1)  # FP32 first: its baseline


class DriftingMeasurer(KernelSumMeasurer):
    """:class:`KernelSumMeasurer`'s noiseless costs, on a device that runs 100x slower after its first
    measurement (a shared host that got busy): FP32, measured first, looks faster than any build after it."""

    name = "drifting"

    def __init__(self):
        super().__init__()
        self.seen = []

    def measure(self, lib_path, inputs):
        m = super().measure(lib_path, inputs)
        slow = 1.0 if self.calls == 1 else 100.0
        self.seen.append(lib_path.name)
        return Measurement(m.latency_ms * slow, 0.0, 1, kernels=tuple((s, t * slow) for s, t in m.kernels))


def _search(onnx, data, log, cache, rounds, resume=False):
    m = DriftingMeasurer()
    e = SearchEngine(onnx, "x86-avx512-vnni", data[0], data[1], log_path=log, cache_dir=cache, measurer=m,
                     accuracy_drop="2%", weight_bits=[8], max_trials=3, settle_rounds=rounds, resume=resume)
    return e, e.run(EVOLVE), m


def _settled(log) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()[1:]) if r["key"].startswith("settled|")]


def test_drift_picks_fp32_unless_the_contenders_are_retimed_side_by_side(mnist_onnx_path, small_data, tmp_path,
                                                                           warm_cache):
    e, first, m = _search(mnist_onnx_path, small_data, tmp_path / "off.jsonl", warm_cache, rounds=0)
    assert first.best.label == "FP32" and m.calls == first.trials  # what the drift alone decides
    assert not _settled(tmp_path / "off.jsonl")

    log = tmp_path / "on.jsonl"
    e, r, m = _search(mnist_onnx_path, small_data, log, warm_cache, rounds=2)
    assert r.met_target and r.best.label != "FP32"
    assert r.best.latency_ms < r.fp32.latency_ms  # both from the same (slow) minutes
    settled = _settled(log)
    group = {s["key"].split("|", 1)[1] for s in settled}
    assert r.best.key in group and r.fp32.key in group and 2 <= len(settled) <= 4
    assert all(len(s["rounds"]) == 2 for s in settled)
    fp32 = next(s for s in settled if s["key"] == f"settled|{r.fp32.key}")
    assert fp32["first_ms"] * 50 < fp32["latency_ms"]  # FP32's first, fast-phase figure no longer decides
    assert m.calls == r.trials + 2 * len(settled) and e.retimed == 2 * len(settled)  # not counted as trials
    assert "side by side" in r.message

    # resumed with nothing new: the settled latencies are read back and nothing is measured again
    e2, r2, m2 = _search(mnist_onnx_path, small_data, log, warm_cache, rounds=2, resume=True)
    assert m2.calls == 0 and r2.best.key == r.best.key and r2.best.latency_ms == r.best.latency_ms
    # resumed with settling off: the first figures decide again, as without it
    e3, r3, m3 = _search(mnist_onnx_path, small_data, log, warm_cache, rounds=0, resume=True)
    assert m3.calls == 0 and r3.best.label == "FP32" and r3.fp32.latency_ms == fp32["first_ms"]


@pytest.mark.parametrize("rounds", [-1, 1.5, True])
def test_settle_rounds_must_be_a_whole_number(mnist_onnx_path, small_data, tmp_path, rounds):
    with pytest.raises(SearchError, match="settle rounds"):
        SearchEngine(mnist_onnx_path, "x86-avx512-vnni", small_data[0], small_data[1], log_path=tmp_path / "l",
                     settle_rounds=rounds)
