"""rpc: run and time a build on a board through TVM's RPC tracker.

Remote specs (``execution: remote``, e.g. the Raspberry Pis) are measured the
way TVM's AutoTVM/MetaSchedule measure them: the board runs ``tvm.exec.rpc_server``
registered with a tracker under a key (``rpc.key`` in the spec); hago asks the
tracker for a session, uploads the exported ``model.so``, loads it into a remote
``relax.VirtualMachine`` and times ``main`` with the remote ``time_evaluator``,
so no network time is counted.

TVM's client retries a refused tracker for 60 s and waits forever for a busy
key. Here the tracker is probed first (:func:`check_tracker`, a short timeout
on every socket operation), the key must be registered, and the tracker
socket gets the caller's timeout, so a dead or absent board is a one-line
error within seconds. :func:`measure_rpc`
returns that error in its :class:`~hago.measure.Measurement` (data for the
search); :func:`run_rpc` raises :class:`~hago.errors.MeasureError`.
:class:`RPCMeasurer` is the search's :class:`~hago.measure.Measurer` over it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import MeasureError, error_line
from .base import InputSpec, Measurement, check_timeout

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0  # a tracker on a LAN answers a TCP connect in well under this


def parse_tracker(tracker: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; a one-line :class:`MeasureError` otherwise."""
    host, sep, port = str(tracker).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeasureError(f"RPC tracker must be 'host:port', got {tracker!r}")
    return host, int(port)


def _resolve(spec, tracker: str | None, key: str | None) -> tuple[str, int, str]:
    rpc = getattr(spec, "rpc", None)
    tracker = tracker or (rpc.tracker if rpc else None)
    key = key or (rpc.key if rpc else None)
    name = getattr(spec, "name", "this device")
    if not tracker:
        raise MeasureError(f"no RPC tracker for {name}: pass --rpc HOST:PORT or set rpc.tracker in its spec")
    if not key:
        raise MeasureError(f"no RPC key for {name}: pass one or set rpc.key in its spec")
    return (*parse_tracker(tracker), key)


def _tracker_call(host: str, port: int, request: list, timeout: float, waiting: str | None = None):
    """One request to the tracker on a fresh socket with ``timeout`` on every operation; its answer.

    ``waiting`` names what a request that may wait is waiting for, so running
    out of time is said as that, not as a tracker that does not answer.
    """
    import struct

    from tvm.rpc import base

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        reason = e.strerror or (f"no answer in {timeout:g}s" if isinstance(e, TimeoutError) else type(e).__name__)
        raise MeasureError(f"RPC tracker {host}:{port} unreachable ({reason}): "
                           "is `python -m tvm.exec.rpc_tracker` running there?") from None
    try:
        with sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise ValueError("wrong magic")
            base.sendjson(sock, request)
            value = base.recvjson(sock)
        if not isinstance(value, list) or not value or value[0] != base.TrackerCode.SUCCESS:
            raise ValueError(f"unexpected answer {str(value)[:80]}")
        return value
    except TimeoutError:
        if waiting is None:
            raise MeasureError(f"{host}:{port} does not answer as an RPC tracker (no answer in {timeout:g}s): "
                               "is `python -m tvm.exec.rpc_tracker` running there?") from None
        raise MeasureError(f"no {waiting} on tracker {host}:{port} in {timeout:g}s") from None
    except (OSError, ValueError, RuntimeError, struct.error, TypeError, IndexError, AttributeError) as e:
        raise MeasureError(f"{host}:{port} does not answer as an RPC tracker ({error_line(e)}): "
                           "is `python -m tvm.exec.rpc_tracker` running there?") from None


def tracker_summary(tracker: str, timeout: float = CONNECT_TIMEOUT_S) -> dict:
    """The tracker's ``SUMMARY``: ``{"queue_info": {key: {"free", "pending"}}, "server_info": [{"key", "addr"}]}``.

    Speaks the tracker protocol itself on a socket with ``timeout`` on every
    operation: TVM's ``connect_tracker`` retries a refused port for 60 s and
    would wait forever on a port that never answers.
    """
    from tvm.rpc import base

    host, port = parse_tracker(tracker)
    summary = _tracker_call(host, port, [base.TrackerCode.SUMMARY], timeout)[1]
    if not isinstance(summary, dict) or not isinstance(summary.get("queue_info"), dict):
        raise MeasureError(f"{host}:{port} does not answer as an RPC tracker (unexpected summary "
                           f"{str(summary)[:80]})")
    return summary


def check_tracker(tracker: str, key: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> dict:
    """The tracker's queue summary (``{key: {"free": n, "pending": m}}``); a one-line :class:`MeasureError`
    if it is unreachable, is not an RPC tracker, or (with ``key``) has no server registered as ``key``."""
    servers = tracker_summary(tracker, timeout)["queue_info"]
    if key is not None and key not in servers:
        host, port = parse_tracker(tracker)
        known = ", ".join(sorted(servers)) or "none"
        raise MeasureError(f"no RPC server registered as {key!r} on tracker {host}:{port} (keys: {known})")
    return servers


def request_server(tracker: str, key: str, timeout: float) -> tuple[str, int, str]:
    """``(address, port, match key)`` of a free server registered as ``key``, waiting at most ``timeout``.

    TVM's ``TrackerSession.request`` connects at once and hides which server
    it got; a farm needs the address (the board's name in the log) first.
    The tracker hands each free server to one requester; a server handed out
    but never connected puts itself back after a few seconds.
    """
    from tvm.rpc import base

    host, port = parse_tracker(tracker)
    value = _tracker_call(host, port, [base.TrackerCode.REQUEST, key, "", 1], timeout,
                          waiting=f"free board under {key!r}")
    url, server_port, matchkey = value[1]
    return str(url), int(server_port), str(matchkey)


def time_remote(remote, lib_path: Path, arrays: list[np.ndarray], *, device: str = "cpu", repeat: int = 5,
                min_repeat_ms: float = 100, timer: str | None = None) -> Measurement:
    """Upload ``lib_path`` into session ``remote``, load it into a VM and time ``main``; raises on failure.

    ``timer`` names a function registered on the server that times the
    uploaded library itself (``timer(name) -> ms``) instead of the remote
    ``time_evaluator``: a deterministic stand-in that keeps the whole RPC
    transport real, for tests of the farm's scheduling.
    """
    import tvm

    if timer is not None:
        name = f"hago_{uuid.uuid4().hex[:8]}_{lib_path.name}"
        remote.upload(str(lib_path), target=name)
        return Measurement(float(remote.get_function(timer)(name)), 0.0, 1)
    vm, dev = _load_remote(remote, lib_path, device)
    args = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in arrays]
    vm["main"](*args)  # warm-up: lazy initialisation on the board
    res = vm.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)(*args)
    return Measurement(float(res.median * 1e3), float(np.std(res.results) * 1e3), repeat)


@contextlib.contextmanager
def session(tracker: str, key: str, timeout: float = 60.0):
    """A remote session on a free server registered as ``key``; closed on exit.

    ``timeout`` bounds the wait for a free server and is the session's lifetime
    on the server, which kills a run that hangs past it.
    """
    from tvm import rpc

    host, port = parse_tracker(tracker)
    check_tracker(tracker, key, timeout=min(CONNECT_TIMEOUT_S, timeout))
    tc = None
    try:
        tc = rpc.connect_tracker(host, port)
        tc._sock.settimeout(timeout)  # TVM leaves it blocking: a busy key would wait forever
        remote = tc.request(key, priority=1, session_timeout=max(1, int(timeout)), max_retry=1)
    except Exception as e:
        raise MeasureError(f"RPC session for {key!r} via {host}:{port} failed: {error_line(e)}") from None
    finally:
        if tc is not None:
            tc.close()
    yield remote  # the server is freed when the last reference to the session goes


def _load_remote(remote, lib_path: Path, device: str = "cpu"):
    """Upload and load ``lib_path``; a GPU build's VM gets the GPU plus the host CPU."""
    from tvm import relax

    name = f"hago_{uuid.uuid4().hex[:8]}_{lib_path.name}"
    remote.upload(str(lib_path), target=name)
    dev, cpu = remote.device(device), remote.cpu()  # device: the backend's ("cpu", "cuda", ...)
    devices = dev if dev.dlpack_device_type() == cpu.dlpack_device_type() else [dev, cpu]
    return relax.VirtualMachine(remote.load_module(name), devices), dev


def run_rpc(lib_path: str | Path, tracker: str, key: str, inputs: list[np.ndarray],
            timeout: float = 60.0) -> list[np.ndarray]:
    """Outputs of ``main`` on the remote device (a tuple is flattened); raises :class:`MeasureError`."""
    import tvm

    lib_path = _existing(lib_path)
    with session(tracker, key, timeout) as remote:
        try:
            vm, dev = _load_remote(remote, lib_path)
            out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs])
            return [t.numpy() for t in _flatten(out)]
        except Exception as e:
            raise MeasureError(f"{lib_path.name} failed on {key!r}: {error_line(e)}") from None


def measure_rpc(lib_path: str | Path, spec=None, tracker: str | None = None, key: str | None = None,
                inputs: list[np.ndarray] | None = None, timeout: float = 60.0, *,
                repeat: int = 5, min_repeat_ms: float = 200, device: str = "cpu") -> Measurement:
    """Median latency of ``main`` on a board reached through an RPC tracker.

    Parameters
    ----------
    lib_path : path
        The exported library for the board (``model.so`` of ``hago compile``).
    spec : HardwareSpec, optional
        Supplies ``rpc.tracker`` and ``rpc.key`` where the arguments are not given.
    tracker : str
        ``"host:port"`` of the RPC tracker.
    key : str
        The device key the board's RPC server registered with.
    inputs : list of np.ndarray
        One array per ``main`` parameter.
    timeout : float
        Seconds to wait for a free board, and the session's lifetime on it.

    Never raises for a bad tracker, board or build: the ``Measurement`` then
    has ``latency_ms=None`` and a one-line ``error``.
    """
    try:
        host, port, key = _resolve(spec, tracker, key)
        if not inputs:
            raise MeasureError("measure_rpc needs example inputs, one array per main parameter")
        lib_path = _existing(lib_path)
        with session(f"{host}:{port}", key, timeout) as remote:
            return time_remote(remote, lib_path, inputs, device=device, repeat=repeat, min_repeat_ms=min_repeat_ms)
    except MeasureError as e:
        return Measurement(None, error=str(e))
    except Exception as e:  # a failed board or build is a result, not a crash of hago
        return Measurement(None, error=error_line(e, with_type=True))


def _existing(lib_path: str | Path) -> Path:
    path = Path(lib_path)
    if not path.is_file():
        raise MeasureError(f"no library at {path}: run `hago compile` for this device first")
    return path


def _flatten(value) -> list:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    return [t for v in value for t in _flatten(v)]


class RPCMeasurer:
    """Times builds on a remote device reached through an RPC tracker (``host:port`` and ``key``).

    With ``check`` (the default) the tracker is asked once, on construction,
    whether it answers and has a server under ``key``
    (:func:`check_tracker`, a few seconds at most): an unreachable
    tracker or an absent board is a one-line :class:`~hago.errors.MeasureError`
    before any candidate is built, instead of a search whose every
    measurement fails.
    """

    name = "rpc"

    def __init__(self, tracker: str, key: str, timeout_s: float = 60.0, repeat: int = 5, min_repeat_ms: float = 100,
                 device: str = "cpu", check: bool = True):
        timeout_s = check_timeout(timeout_s)
        parse_tracker(tracker)
        if check:
            check_tracker(tracker, key)
        self.tracker, self.key, self.timeout_s, self.device = tracker, key, timeout_s, device
        self.repeat, self.min_repeat_ms = repeat, min_repeat_ms

    def measure(self, lib_path: Path, inputs: InputSpec) -> Measurement:
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(shape).astype(dtype) for shape, dtype in inputs]
        m = measure_rpc(lib_path, tracker=self.tracker, key=self.key, inputs=arrays, timeout=self.timeout_s,
                        repeat=self.repeat, min_repeat_ms=self.min_repeat_ms, device=self.device)
        return replace(m, board=f"{self.key}@{self.tracker}")  # whichever board the tracker gave: one session
