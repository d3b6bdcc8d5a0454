"""The search over a farm: a local TVM tracker with several RPC servers on 127.0.0.1 posing as boards.

The boards (:mod:`farm_boards`) answer ``hago.board_facts`` like
``python -m hago.measure.board`` and time libraries with a deterministic stand-in
behind the real RPC transport (upload, remote call), so a parallel search and
a one-board search receive the same measurements and can be compared exactly.
The kill -9 test measures for real (the remote ``time_evaluator``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

import farm_boards
from conftest import local_rpc
from hago.cli import main
from hago.errors import MeasureError
from hago.hwspec import HardwareSpec
from hago.measure.farm import FarmMeasurer
from hago.measure.rpc import check_tracker
from hago.search.algorithms import ALGORITHMS
from hago.search.engine import SearchEngine

pytestmark = [pytest.mark.llvm, pytest.mark.rpc]
SPEC = "x86-avx512-vnni"


@pytest.fixture(scope="module")
def farm():
    """A tracker holding ``farm``: three x86 boards and one that says it is aarch64; ``crash``: a board, and one
    that kills its own server on its first measurement."""
    boards = [("farm", farm_boards.fake_board)] * 3 + [("farm", farm_boards.foreign_board),
                                                      ("crash", farm_boards.fake_board),
                                                      ("crash", farm_boards.crashing_board)]
    with local_rpc("farm", port=10000, boards=boards) as tracker:
        yield tracker


def _records(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()[1:]]


def _search(onnx, data, log, cache, measurer, trials):
    e = SearchEngine(onnx, SPEC, data[0], data[1], log_path=log, cache_dir=cache, measurer=measurer,
                     max_trials=trials, accuracy_drop="2%")
    return e.run(ALGORITHMS["greedy"])


def test_three_boards_all_measure_and_the_search_chooses_as_on_one(farm, mnist_onnx_path, small_data, warm_cache,
                                                                   tmp_path, caplog):
    spec = HardwareSpec.load(SPEC)
    with caplog.at_level(logging.WARNING, logger="hago.measure.farm"):
        parallel = FarmMeasurer(farm, "farm", spec, timer=farm_boards.TIMER, timeout_s=30)
    # the fourth board says it is aarch64: refused, in one line, and never measures
    assert len(parallel.accepted) == 3 and parallel.workers == 3
    (refused, why), = parallel.refused.items()
    assert "is aarch64, the spec's builds are x86_64" in why
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and refused in lines[0] and "\n" not in lines[0]

    # three measurements sent at once run side by side, one per board (a search overlaps them only when a
    # board takes longer than building the next candidate, which depends on the machine's load). Their timers
    # meet at a barrier, so the overlap does not hang on how fast a loaded machine connects and uploads; were
    # the farm to measure one at a time, the barrier would time out and peak_busy would stay below 3.
    lib = tmp_path / "lib.bin"
    (tmp_path / "barrier").mkdir()
    farm_boards.barrier_library(lib, tmp_path / "barrier")
    deadline = time.monotonic() + 30  # the boards the probe held register again with the tracker first
    while check_tracker(farm, "farm")["farm"].get("free", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    done = [f.result() for f in [parallel.submit(lib, []) for _ in range(3)]]
    assert parallel.peak_busy == 3 and {m.board for m in done} == parallel.accepted
    assert all(m.latency_ms == pytest.approx(0.01) for m in done)  # the stand-in timer: size / 1e5

    one = FarmMeasurer(farm, "farm", spec, timer=farm_boards.TIMER, timeout_s=30, max_devices=1)
    assert one.workers == 1
    results = {}
    for name, measurer in (("one", one), ("parallel", parallel)):
        results[name] = _search(mnist_onnx_path, small_data, tmp_path / f"{name}.jsonl", warm_cache, measurer, 4)
        measurer.close()
    a, b = results["one"], results["parallel"]
    assert b.trials == a.trials == 4
    assert b.best.point == a.best.point and b.met_target == a.met_target
    assert {c.key: c.latency_ms for c in b.candidates} == {c.key: c.latency_ms for c in a.candidates}
    # every measurement line names its board; all three x86 boards measured, side by side
    boards = [r["board"] for r in _records(tmp_path / "parallel.jsonl") if r["key"].startswith("latency|")]
    assert len(boards) == 4 and set(boards) <= parallel.accepted
    assert one.peak_busy == 1  # one board: never two measurements at once


def test_a_board_that_dies_mid_search_is_retried_on_another(farm, mnist_onnx_path, small_data, warm_cache,
                                                            tmp_path):
    farm_ = FarmMeasurer(farm, "crash", HardwareSpec.load(SPEC), timer=farm_boards.TIMER, timeout_s=30)
    assert farm_.workers == 2
    r = _search(mnist_onnx_path, small_data, tmp_path / "c.jsonl", warm_cache, farm_, 4)
    farm_.close()
    assert r.trials == 4 and all(c.error is None and c.latency_ms is not None for c in r.candidates
                                 if c.latency_ms is not None or c.error is not None)
    records = _records(tmp_path / "c.jsonl")
    attempts = [rec for rec in records if rec["key"].startswith("attempt|")]
    assert len(attempts) == 1, attempts  # the crash, logged with its board
    dead = attempts[0]["board"]
    assert dead in farm_.accepted and dead in attempts[0]["error"]
    retried = next(rec for rec in records if rec["key"] == "latency|" + attempts[0]["key"].split("|")[1])
    assert retried["latency_ms"] is not None and retried["board"] != dead
    assert farm_.status()["lost"] == 1


def test_a_farm_with_no_board_that_fits_the_spec_is_one_line(farm):
    # rpi5 builds need aarch64 with the dot product: the x86 boards and the aarch64 one without it are refused
    t0 = time.monotonic()
    with pytest.raises(MeasureError, match="no usable board under 'farm'") as err:
        FarmMeasurer(farm, "farm", HardwareSpec.load("rpi5"), timeout_s=30)
    msg = str(err.value)
    assert "\n" not in msg and "lacks CPU flags asimddp" in msg and "the spec's builds are aarch64" in msg
    assert time.monotonic() - t0 < 10


def test_cli_absent_key_fails_in_one_line_within_seconds(farm, small_npz, mnist_onnx_path, tmp_path, capsys):
    t0 = time.monotonic()
    code = main(["search", str(mnist_onnx_path), "--device", SPEC, "--calib", str(small_npz[0]),
                 "--eval", str(small_npz[1]), "--rpc", farm, "--key", "nosuch", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no RPC server registered as 'nosuch'" in err[0], err
    assert time.monotonic() - t0 < 10


def test_devices_lists_what_the_tracker_holds(farm, capsys):
    assert main(["devices", "--rpc", farm]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if " farm " in f" {line} ")
    assert " 4 " in row and row.count("127.0.0.1:") >= 3  # free boards, and their addresses


def test_tuning_runner_gets_a_worker_per_free_board(farm, monkeypatch):
    from tvm.s_tir import meta_schedule as ms

    from hago.tune import rpc_runner

    seen = {}

    class Runner:
        def __init__(self, config, evaluator_config=None, max_workers=None):
            seen["workers"], seen["key"] = max_workers, config.tracker_key

    monkeypatch.setattr(ms.runner, "RPCRunner", Runner)
    rpc_runner(farm, "farm")
    assert seen == {"workers": 4, "key": "farm"}
    rpc_runner(farm, "farm", max_workers=2)
    assert seen["workers"] == 2


def test_kill_9_during_a_parallel_search_then_resume_repeats_nothing(farm, mnist_onnx_path, small_npz, warm_cache,
                                                                     tmp_path):
    log = tmp_path / "k.jsonl"
    env = {**os.environ, "HAGO_CACHE_DIR": str(warm_cache)}  # calibration and FP32 outputs: not what is tested
    cmd = [sys.executable, "-m", "hago", "search", str(mnist_onnx_path), "--device", SPEC,
           "--calib", str(small_npz[0]), "--eval", str(small_npz[1]), "--algorithm", "greedy", "--max-trials", "4",
           "--accuracy-drop", "2%", "--corrections", "none", "--rpc", farm, "--key", "farm", "--measure-timeout", "30"]
    proc = subprocess.Popen([*cmd, "--log", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def measured():
        return [r["key"] for r in _records(log) if r["key"].startswith("latency|")] if log.exists() else []

    deadline = time.time() + 240
    while time.time() < deadline and len(measured()) < 2 and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = measured()
    assert len(before) >= 2
    done = subprocess.run([*cmd, "--resume", str(log), "-o", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    after = measured()
    assert len(after) == len(set(after)), "a candidate was measured twice"
    assert after[:len(before)] == before
    assert "reused from the log" in done.stdout
    assert all(r["board"].startswith("127.0.0.1:") for r in _records(log) if r["key"].startswith("latency|"))
    for name in ("model.so", "strategy.json", "report.json", "pareto.json", "pareto.png"):
        assert (tmp_path / "out" / name).is_file()
