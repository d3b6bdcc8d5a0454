"""Init callbacks for the RPC servers that pose as a farm's boards in the tests (TVM's ``server_init_callback``).

Every board registers hago's ``hago.board_facts`` (what ``python -m
hago.measure.board`` does) and a deterministic timer, :data:`TIMER`: it sleeps
:data:`DELAY` seconds (a measurement that takes time, so boards overlap) and
returns a latency computed from the uploaded library's size, so a search over
one board and one over three receive exactly the same measurements through
the real RPC transport. A library that starts with :data:`BARRIER` names a
folder after it: its timer waits there until :data:`BARRIER_PARTIES` timers
have arrived, so a test can require measurements that truly run side by side
without depending on how fast a loaded machine connects and uploads. Two boards misbehave on purpose:

* :func:`crashing_board` kills its own server process on its first
  measurement (a board that drops out mid-search);
* :func:`foreign_board` says it is an aarch64 board without the dot product (a heterogeneous farm).

The servers run in fresh processes that cannot import this file, so it is
pickled by value (cloudpickle).
"""

from __future__ import annotations

import sys

import cloudpickle

TIMER = "hago.test.fake_timer"
DELAY = 1.0  # a measurement that takes time, so three sent at once are on three boards together
BARRIER = b"hago-barrier:"
BARRIER_PARTIES = 3
BARRIER_WAIT_S = 60.0


def barrier_library(path, folder) -> None:
    """Write a 1000-byte library at ``path`` whose timers meet in ``folder`` before they return."""
    head = BARRIER + str(folder).encode() + b"\n"
    path.write_bytes(head + b"\0" * (1000 - len(head)))


def fake_board() -> None:
    import os
    import time

    import tvm

    from hago.measure.board import register

    register()

    def timer(name):
        path = tvm.get_global_func("tvm.rpc.server.workpath")(name)
        with open(path, "rb") as f:
            head = f.readline()
        if head.startswith(BARRIER):  # wait until every party is inside a measurement at once
            folder = head[len(BARRIER):].strip().decode()
            open(os.path.join(folder, os.path.basename(path)), "w").close()
            deadline = time.monotonic() + BARRIER_WAIT_S
            while len(os.listdir(folder)) < BARRIER_PARTIES and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            time.sleep(DELAY)
        return os.path.getsize(path) / 1e5

    tvm.register_global_func(TIMER, timer, override=True)


def crashing_board() -> None:
    import os
    import signal

    import tvm

    fake_board()

    def crash(name):
        os.kill(os.getppid(), signal.SIGKILL)  # the server this session was forked from
        os._exit(3)

    tvm.register_global_func(TIMER, crash, override=True)


def foreign_board() -> None:
    import json

    import tvm

    from hago.measure.board import FACTS_FUNCTION

    fake_board()
    facts = {"machine": "aarch64", "system": "Linux", "cpu_flags": ["fp", "asimd"], "cpu_model": "",
             "cores": 4, "gpus": []}
    tvm.register_global_func(FACTS_FUNCTION, lambda: json.dumps(facts), override=True)


cloudpickle.register_pickle_by_value(sys.modules[__name__])
