"""What runs on a board of a farm: TVM's RPC server, plus one function that says what the board is.

Start it on every board (or GPU host) instead of ``python -m tvm.exec.rpc_server``::

    python -m hago.measure.board --tracker 192.168.1.5:9190 --key rpi4
    python board.py --tracker 192.168.1.5:9190 --key rpi4    # this file copied alone: it needs only TVM

It is TVM's server (same tracker protocol, same forked session per client),
with ``hago.board_facts`` registered in it. hago calls that function when a
board first hands it a session and refuses a board whose facts do not fit the
spec (another architecture, a missing CPU feature, another GPU): timings from
different hardware must never be mixed in one search
(:mod:`hago.measure.farm`). A plain ``tvm.exec.rpc_server`` still works, but
its CPU cannot be checked (hago says so once per board).

To give each board process its own cores on a shared machine, start it under
``taskset``; the sessions it forks inherit the affinity.

This module imports only the standard library and TVM, so it runs on a board
that has no hago installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

FACTS_FUNCTION = "hago.board_facts"


def board_facts() -> dict:
    """This machine as hago compares it with a spec: architecture, CPU flags, cores, GPUs."""
    facts = {"machine": platform.machine().lower(), "system": platform.system(), "cpu_flags": [],
             "cpu_model": "", "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count(), "gpus": []}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name in ("flags", "features") and not facts["cpu_flags"]:  # x86 "flags", arm "Features"
                    facts["cpu_flags"] = sorted(value.split())
                elif name in ("model name", "cpu model") and not facts["cpu_model"]:
                    facts["cpu_model"] = value.strip()
    except OSError:
        pass
    try:
        import tvm

        for i in range(8):
            dev = tvm.cuda(i)
            if not dev.exist:
                break
            facts["gpus"].append({"name": dev.device_name, "compute_version": dev.compute_version})
    except Exception:  # a CPU-only runtime has no CUDA device API
        pass
    return facts


def register() -> None:
    """Make :func:`board_facts` callable over RPC (TVM's ``server_init_callback``)."""
    import tvm

    tvm.register_global_func(FACTS_FUNCTION, lambda: json.dumps(board_facts()), override=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hago.measure.board", description=__doc__.splitlines()[0])
    p.add_argument("--tracker", required=True, help="the tracker's host:port")
    p.add_argument("--key", required=True, help="the device key the spec's rpc.key (or --key) names")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--port-end", type=int, default=9199)
    p.add_argument("--custom-addr", help="the address to report to the tracker (behind NAT)")
    args = p.parse_args(argv)
    host, _, port = args.tracker.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--tracker must be host:port, got {args.tracker!r}")
    from tvm import rpc

    server = rpc.Server(args.host, args.port, args.port_end, key=args.key, tracker_addr=(host, int(port)),
                        custom_addr=args.custom_addr, silent=True, server_init_callback=register)
    print(f"board {platform.node()} registered as {args.key!r} with {args.tracker} (port {server.port})",
          flush=True)
    server.proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
