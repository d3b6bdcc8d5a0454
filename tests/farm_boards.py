"""Init callbacks for the RPC servers that pose as a farm's boards in the tests (TVM's ``server_init_callback``).

Every board registers hago's ``hago.board_facts`` (what ``python -m
hago.measure.board`` does) and a deterministic timer, :data:`TIMER`: it sleeps
:data:`DELAY` seconds (a measurement that takes time, so boards overlap) and
returns a latency computed from the uploaded library's size, so a search over
one board and one over three receive exactly the same measurements through
the real RPC transport. Two boards misbehave on purpose:

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


def fake_board() -> None:
    import os
    import time

    import tvm

    from hago.measure.board import register

    register()

    def timer(name):
        path = tvm.get_global_func("tvm.rpc.server.workpath")(name)
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
