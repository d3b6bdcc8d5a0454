"""The search log survives torn writes, refuses damage in one line, and ``--resume`` needs a real log."""

from __future__ import annotations

import json
import logging

import pytest

from hago.cli import main
from hago.measure import Measurement
from hago.search.algorithms import ALGORITHMS
from hago.search.engine import SearchEngine
from hago.search.log import SearchLog
from hago.search.target import SearchError

HEADER = {"graph_hash": "g", "device": "d", "space": ["8 8"]}
KEYS = [f"latency|{i}" for i in range(10)]


def _tear(path, keep_fraction=0.5):
    """Cut the file in the middle of its last record, as ``kill -9`` during the write leaves it."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:start + int((len(data) - start) * keep_fraction)])
    assert not path.read_bytes().endswith(b"\n")
    return json.loads(data[start:])["key"]


def _run(path, measured, stop_after=None, resume=True):
    """A search in miniature: measure each key not yet in the log (counting it), log it."""
    log = SearchLog(path, HEADER, resume=resume)
    for i, key in enumerate(KEYS):
        if stop_after is not None and i >= stop_after:
            break
        if log.get(key) is None:
            measured.append(key)
            log.add({"key": key, "point": [i], "latency_ms": float(i), "error": None})


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line must parse


def test_torn_log_resumed_twice_loses_nothing_and_measures_nothing_twice(tmp_path, caplog):
    path = tmp_path / "s.jsonl"
    measured: list[str] = []
    _run(path, measured, stop_after=4, resume=False)
    torn = [_tear(path)]
    caplog.set_level(logging.WARNING)
    _run(path, measured, stop_after=7)
    assert any("cut off its last line" in r.getMessage() for r in caplog.records)
    torn.append(_tear(path, 0.9))
    _run(path, measured)
    lines = _lines(path)
    assert lines[0]["header"]["graph_hash"] == "g"
    keys = [rec["key"] for rec in lines[1:]]
    assert keys == KEYS  # 0 records lost, none merged, none duplicated
    # only the two torn candidates were measured a second time (their records never reached the disk)
    assert len(measured) == len(KEYS) + 2 and sorted(measured) == sorted(KEYS + torn)
    _run(path, measured)
    assert len(measured) == len(KEYS) + 2  # a third resume measures nothing


def test_a_whole_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "s.jsonl"
    _run(path, [], stop_after=3, resume=False)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    measured: list[str] = []
    _run(path, measured, stop_after=4)
    assert measured == ["latency|3"] and [r["key"] for r in _lines(path)[1:]] == KEYS[:4]


@pytest.mark.parametrize("bad, problem", [
    ("[1, 2]", "not a search record"),
    ('{"point": [1], "latency_ms": 1.0}', 'without a "key"'),
    ('{"key": "accuracy|1", "point": [1]}', "has no accuracy"),
    ('{"key": "latency|1", "point": "8 8", "latency_ms": 1.0}', "malformed point"),
    ('{"key": "latency|1", "point": [1], "lat', "not a JSON record"),
])
def test_a_non_record_line_is_one_line_error_naming_file_and_line(tmp_path, bad, problem):
    path = tmp_path / "s.jsonl"
    _run(path, [], stop_after=2, resume=False)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], bad, *lines[2:]]) + "\n")
    with pytest.raises(SearchError) as err:
        SearchLog(path, HEADER, resume=True)
    msg = str(err.value)
    assert "\n" not in msg and f"{path}:3:" in msg and problem in msg


@pytest.mark.parametrize("first", ["[1, 2]", '{"head": 1}', "\x80\x81"])
def test_a_log_without_header_is_one_line_error(tmp_path, first):
    path = tmp_path / "s.jsonl"
    path.write_bytes(first.encode("latin-1") + b"\n")
    with pytest.raises(SearchError, match="not a hago search log"):
        SearchLog(path, HEADER)


def test_resume_needs_an_existing_log(tmp_path):
    with pytest.raises(SearchError, match="no such log"):
        SearchLog(tmp_path / "missing.jsonl", HEADER, resume=True)
    assert not (tmp_path / "missing.jsonl").exists()
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(SearchError, match="empty"):
        SearchLog(tmp_path / "empty.jsonl", HEADER, resume=True)
    (tmp_path / "torn.jsonl").write_text('{"header": {"log_ver')
    with pytest.raises(SearchError, match="holds no search"):
        SearchLog(tmp_path / "torn.jsonl", HEADER, resume=True)
    SearchLog(tmp_path / "new.jsonl", HEADER)  # without resume a missing log is started
    assert _lines(tmp_path / "new.jsonl")[0]["header"]["device"] == "d"


@pytest.mark.parametrize("content, problem", [
    (None, "no such log"),
    (b"", "the log is empty"),
    (b'{"header": {"log_ver', "holds no search"),
    (b'[1, 2]\nnot json at all\n', "not a hago search log"),
    (b'{"header": {"log_version": 1}}\n{"key": "latency|1", "point": [1], "latency_ms": 2.0}\nnot json\n', ":3: not a JSON"),
])
def test_cli_resume_of_missing_empty_or_damaged_log_fails_in_one_line_before_set_up(
        tmp_path, small_npz, mnist_onnx_path, capsys, monkeypatch, content, problem):
    import hago.search.engine as engine_mod

    def never(*a, **k):
        raise AssertionError("the search was set up before the log was checked")

    monkeypatch.setattr(engine_mod, "prepare_model", never)
    log = tmp_path / "s.jsonl"
    if content is not None:
        log.write_bytes(content)
    code = main(["search", str(mnist_onnx_path), "--device", "x86-avx512-vnni", "--calib", str(small_npz[0]),
                 "--eval", str(small_npz[1]), "--resume", str(log), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("hago: error: "), err
    assert problem in err[0] and str(log) in err[0]
    assert log.exists() == (content is not None) and not (tmp_path / "out" / "model.so").exists()
    if content is not None:
        assert log.read_bytes() == content  # a failed resume leaves the log as it was


class CountingMeasurer:
    """A device whose latency is the library's size in kB (deterministic); counts its measurements."""

    name = "counting"

    def __init__(self):
        self.libs = []

    def measure(self, lib_path, inputs):
        self.libs.append(lib_path.name)
        return Measurement(lib_path.stat().st_size / 1e3, 0.0, 1)


@pytest.mark.llvm
def test_engine_resumes_a_torn_log_twice_without_measuring_twice(mnist_onnx_path, small_data, tmp_path, warm_cache):
    log, cache = tmp_path / "e.jsonl", warm_cache
    runs = []

    def run(trials, resume):
        m = CountingMeasurer()
        e = SearchEngine(mnist_onnx_path, "x86-avx512-vnni", small_data[0], small_data[1], log_path=log,
                         cache_dir=cache, measurer=m, max_trials=trials, resume=resume, weight_bits=[8],
                         settle_rounds=0)  # counts trials only: re-timing is tests/search/test_settle.py's
        e.run(ALGORITHMS["greedy"])
        runs.append(m)

    def tear_last_latency():
        """Cut the log inside its last latency record: a kill during that write (nothing after it was written)."""
        lines = log.read_bytes().splitlines(keepends=True)
        i = max(j for j, ln in enumerate(lines) if ln.startswith(b'{"key": "latency|'))
        log.write_bytes(b"".join(lines[:i]) + lines[i][:len(lines[i]) // 2])
        return json.loads(lines[i])["key"]

    run(2, resume=False)
    torn = [tear_last_latency()]
    run(2, resume=True)
    torn.append(tear_last_latency())
    run(5, resume=True)
    records = _lines(log)[1:]  # every line parses: nothing was appended onto a torn line
    latency = [r["key"] for r in records if r["key"].startswith("latency|")]
    assert len(latency) == len(set(latency)) >= 4
    measured = sum(len(m.libs) for m in runs)
    # every logged latency was measured once, plus once more for each torn record: 0 lost, 0 twice
    assert measured == len(latency) + len(torn)
    assert all(t in latency for t in torn)
