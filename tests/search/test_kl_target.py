"""The ``kl`` metric and ``--max-kl``: a search target that near-ties cannot decide."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

from hago.cli import main
from hago.evaluate import mean_kl
from hago.search.algorithms import ALGORITHMS
from hago.search.target import KL_METRIC, SearchError, kl_target, make_metric

from .test_engine import _engine, data  # noqa: F401  (data: the fixture)


def test_mean_kl_is_the_worked_two_class_value():
    ref = np.log(np.array([[0.8, 0.2], [0.5, 0.5]]))
    out = np.log(np.array([[0.6, 0.4], [0.5, 0.5]]))
    by_hand = (0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4)) / 2  # the second row adds 0
    assert mean_kl(out, ref) == pytest.approx(by_hand, rel=1e-12)
    assert mean_kl(out + 7.0, ref) == pytest.approx(by_hand, rel=1e-12)  # logits: a shift changes nothing


def test_kl_metric_scores_fp32_zero_and_the_target_is_an_upper_bound_on_kl():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 10))
    score, name = make_metric(np.zeros(64, np.int64), ref, "kl")  # labels do not override an explicit metric
    assert name == KL_METRIC and score(ref) == 0.0
    near, far = ref + rng.normal(scale=0.01, size=ref.shape), ref + rng.normal(scale=0.5, size=ref.shape)
    assert score(near) == pytest.approx(-mean_kl(near, ref)) and score(far) < score(near) < 0
    t = kl_target(0.001)
    assert t.threshold(score(ref)) == pytest.approx(-0.001)
    assert score(near) >= t.threshold(0.0) > score(far)  # met exactly when mean KL <= 0.001


@pytest.mark.parametrize("bad", [0, -0.1, 1.0, math.nan, True, "0.1"])
def test_bad_max_kl_is_one_line(bad):
    with pytest.raises(SearchError, match="max-kl") as err:
        kl_target(bad)
    assert "\n" not in str(err.value)


def test_kl_metric_with_a_relative_drop_is_refused_before_any_work(tmp_path):
    from hago.search.engine import SearchEngine

    with pytest.raises(SearchError, match="absolute bound"):
        SearchEngine(tmp_path / "no_model.onnx", "x86-avx512-vnni", {}, {}, log_path=tmp_path / "s.jsonl",
                     accuracy_drop="1%", metric="kl")
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize("extra, match", [(["--max-kl", "0.01", "--accuracy-drop", "1%"], "not both"),
                                          (["--max-kl", "-0.5"], "max-kl")])
def test_cli_max_kl_misuse_is_one_line(tmp_path, small_npz, mnist_onnx_path, capsys, extra, match):
    code = main(["search", str(mnist_onnx_path), "--device", "x86-avx512-vnni", "--calib", str(small_npz[0]),
                 "--eval", str(small_npz[1]), *extra, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err


@pytest.mark.llvm
def test_search_on_a_kl_target_returns_a_build_whose_measured_kl_meets_it(mnist_onnx_path, data, tmp_path):  # noqa: F811
    log = tmp_path / "kl.jsonl"
    probe = _engine(mnist_onnx_path, data, tmp_path / "probe.jsonl", metric="kl", accuracy_drop=kl_target(0.5),
                    max_trials=1)
    int8_kl = -probe.accuracy(probe.space.widest()).accuracy  # all-INT8's real KL on this data
    assert int8_kl > 0
    # a bound all-INT8 misses: the search must put some layers back in a more precise form
    e = _engine(mnist_onnx_path, data, log, metric="kl", accuracy_drop=kl_target(int8_kl / 2), max_trials=4)
    r = e.run(functools.partial(ALGORITHMS["evolve"], population=4, rounds=1))
    assert r.met_target and -r.best.accuracy <= int8_kl / 2
    assert r.best.point != e.space.widest()
    header = json.loads(log.read_text().splitlines()[0])["header"]
    assert header["metric"] == KL_METRIC


@pytest.mark.llvm
def test_a_log_scored_on_another_metric_is_not_resumed(mnist_onnx_path, data, tmp_path):  # noqa: F811
    log = tmp_path / "s.jsonl"
    _engine(mnist_onnx_path, data, log, accuracy_drop="1%", max_trials=1)  # agreement: the data has no labels
    with pytest.raises(SearchError, match="another metric"):
        _engine(mnist_onnx_path, data, log, metric="kl", accuracy_drop=kl_target(0.01), max_trials=1, resume=True)


@pytest.mark.llvm
def test_search_cli_with_max_kl_writes_the_kl_into_the_report(tmp_path, small_npz, mnist_onnx_path):
    out = tmp_path / "out"
    code = main(["search", str(mnist_onnx_path), "--device", "x86-avx512-vnni", "--calib", str(small_npz[0]),
                 "--eval", str(small_npz[1]), "--max-kl", "0.05", "--max-trials", "3", "--corrections", "none",
                 "-o", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["search"]["metric"] == KL_METRIC and report["search"]["met_target"]
    assert 0 <= report["mean_kl"] <= 0.05 and report["mean_kl"] == pytest.approx(-report["search"]["chosen_score"])
