"""An unreachable or silent RPC tracker fails in seconds, with one line, before any candidate is built."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import local_rpc
from hago.cli import main
from hago.errors import MeasureError
from hago.measure.rpc import check_tracker
from hago.measure.rpc import RPCMeasurer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rpc_measurer_checks_an_unreachable_tracker_up_front():
    t0 = time.monotonic()
    with pytest.raises(MeasureError, match="unreachable") as err:
        RPCMeasurer(f"127.0.0.1:{_closed_port()}", "rpi4")
    assert time.monotonic() - t0 < 5 and "\n" not in str(err.value)


def test_a_port_that_never_answers_is_not_waited_on():
    """TVM's own client would block forever on the tracker handshake here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # accepts the connection (backlog) but never answers
        t0 = time.monotonic()
        with pytest.raises(MeasureError, match="does not answer as an RPC tracker"):
            check_tracker(f"127.0.0.1:{s.getsockname()[1]}", "rpi4", timeout=1.0)
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("command", ["search", "compile"])
def test_cli_with_unreachable_tracker_fails_fast_in_one_line(tmp_path, small_npz, mnist_onnx_path, capsys, command):
    argv = [command, str(mnist_onnx_path), "--device", "rpi4", "--calib", str(small_npz[0]),
            "--eval", str(small_npz[1]), "--rpc", f"127.0.0.1:{_closed_port()}", "--key", "rpi4",
            "-o", str(tmp_path / "out")]
    t0 = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unreachable" in err[0], err
    assert elapsed < 10
    assert not (tmp_path / "out" / "model.so").exists()


@pytest.mark.rpc
def test_rpc_measurer_accepts_a_live_tracker_and_refuses_an_absent_key():
    with local_rpc("state-board", port=10400) as tracker:  # tracker 10400-10500, servers 10600-10700
        assert "state-board" in check_tracker(tracker, "state-board")
        assert RPCMeasurer(tracker, "state-board").key == "state-board"
        t0 = time.monotonic()
        with pytest.raises(MeasureError, match="no RPC server registered as 'rpi4'.*state-board"):
            RPCMeasurer(tracker, "rpi4")
        assert time.monotonic() - t0 < 5
