"""Search options are validated before any work, in the engine and measurers (so the API gets it too)."""

from __future__ import annotations

import math

import pytest

from hago.cli import main
from hago.errors import MeasureError
from hago.measure import Measurement
from hago.search.algorithms import ALGORITHMS
from hago.search.engine import GIVE_UP_AFTER, SearchEngine
from hago.measure import LocalMeasurer, RPCMeasurer
from hago.search.target import AccuracyTarget, SearchError


@pytest.mark.parametrize("opts, match", [
    ({"accuracy_drop": "200%"}, "out of range"),
    ({"accuracy_drop": "100%"}, "out of range"),
    ({"accuracy_drop": "150pt"}, "out of range"),
    ({"accuracy_drop": "-1%"}, "is not like"),
    ({"accuracy_drop": "abc"}, "is not like"),
    ({"max_trials": 0}, "max trials"),
    ({"max_trials": -3}, "max trials"),
    ({"max_trials": 2.5}, "max trials"),
    ({"time_budget": 0}, "time budget"),
    ({"time_budget": -1.0}, "time budget"),
    ({"time_budget": math.nan}, "time budget"),
    ({"time_budget": "soon"}, "time budget"),
])
def test_bad_engine_options_fail_in_one_line_before_any_work(tmp_path, opts, match):
    with pytest.raises(SearchError, match=match) as err:  # the model does not exist: nothing was loaded
        SearchEngine(tmp_path / "no_model.onnx", "x86-avx512-vnni", {}, {}, log_path=tmp_path / "s.jsonl", **opts)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize("drop, relative", [(2.0, True), (-0.01, False), (1.0, False), (math.nan, True)])
def test_accuracy_target_built_by_hand_is_checked_too(drop, relative):
    with pytest.raises(SearchError, match="out of range"):
        AccuracyTarget(drop, relative)


@pytest.mark.parametrize("drop, threshold", [("0%", 0.9), ("1%", 0.891), ("99.5%", 0.0045), ("0.5pt", 0.895)])
def test_valid_accuracy_drops(drop, threshold):
    assert AccuracyTarget.parse(drop).threshold(0.9) == pytest.approx(threshold)


@pytest.mark.parametrize("timeout", [0.01, 0, -5, math.nan, math.inf, "x"])
def test_bad_measure_timeout_is_refused_by_both_measurers(timeout):
    with pytest.raises(SearchError, match="measure timeout"):
        LocalMeasurer(timeout_s=timeout)
    with pytest.raises(SearchError, match="measure timeout"):  # refused before the tracker is contacted
        RPCMeasurer("127.0.0.1:1", "rpi4", timeout_s=timeout)


@pytest.mark.parametrize("flag, value", [("--accuracy-drop", "200%"), ("--accuracy-drop", "-1%"),
                                         ("--measure-timeout", "0.01"), ("--measure-timeout", "nan"),
                                         ("--max-trials", "0"), ("--time-budget", "0"), ("--settle-rounds", "-1")])
def test_cli_bad_search_option_is_one_line(tmp_path, small_npz, mnist_onnx_path, capsys, flag, value):
    code = main(["search", str(mnist_onnx_path), "--device", "x86-avx512-vnni", "--calib", str(small_npz[0]),
                 "--eval", str(small_npz[1]), f"{flag}={value}", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("hago: error: "), err
    assert not (tmp_path / "out" / "model.so").exists()


class FailingMeasurer:
    name = "failing"

    def __init__(self):
        self.calls = 0

    def measure(self, lib_path, inputs):
        self.calls += 1
        return Measurement(None, error=f"board on fire (call {self.calls})")


@pytest.mark.llvm
@pytest.mark.parametrize("trials", [1, 10])
def test_search_that_measures_nothing_says_so(mnist_onnx_path, small_data, tmp_path, warm_cache, trials):
    m = FailingMeasurer()
    e = SearchEngine(mnist_onnx_path, "x86-avx512-vnni", small_data[0], small_data[1],
                     log_path=tmp_path / "s.jsonl", cache_dir=warm_cache, measurer=m, max_trials=trials)
    with pytest.raises(MeasureError) as err:
        e.run(ALGORITHMS["greedy"])
    msg = str(err.value)
    assert "\n" not in msg and "no candidate met" not in msg
    assert msg.startswith("latency could not be measured on x86-avx512-vnni: board on fire (call 1)")
    assert m.calls == min(trials, GIVE_UP_AFTER)  # a dead device stops the search early
