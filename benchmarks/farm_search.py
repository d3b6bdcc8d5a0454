"""Search wall time over a farm of 1, 2 and 4 boards (issue 19): does measuring in parallel pay?

A local TVM tracker and N board servers (``python -m hago.measure.board``) on
127.0.0.1, each pinned with ``taskset`` to its own share of this machine's
cores (N=1: all of them; N=2: one each; N=4: two boards per core, which
contend), with ``TVM_NUM_THREADS`` set to its share. ``hago``'s evolve search on
EfficientNet-Lite0 (photo crops, ``--accuracy-drop 2%``, ``--max-trials``
measurements) then measures over the farm (``FarmMeasurer``), and the wall time
is split into building candidates, scoring accuracy and waiting for boards.

The default algorithm is ``greedy``: every candidate it builds is measured, in
batches (one knob's choices), which is where boards can work side by side.
``evolve`` spends most of its time scoring accuracy-only candidates on the host
(64 single-knob steps on EfficientNet-Lite0 before its first measurement),
which no number of boards shortens.

The host (builds, accuracy) shares the same cores as the boards here, which a
farm of real boards does not: see the notes this script writes.

    python benchmarks/farm_search.py [--boards 1,2,4] [--max-trials 8] [--algorithm greedy] [--no-write]
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (RESULTS writer, machine notes)

DEVICE = "x86-amx" if "amx_int8" in open("/proc/cpuinfo").read() else "x86-avx512-vnni"
WORK = HERE / "work" / "farm_search"
KEY = "bench-farm"


def _shares(boards: int, cores: list[int]) -> list[list[int]]:
    """Each board's cores: all of them for one board, else round robin (boards beyond the cores share)."""
    if boards == 1:
        return [cores]
    return [[cores[i % len(cores)]] for i in range(boards)]


def _start_farm(boards: int, port: int):
    """A tracker and ``boards`` pinned board servers; returns (tracker address, processes)."""
    from tvm.rpc.tracker import Tracker

    from hago.measure.rpc import check_tracker

    tracker = Tracker(host="127.0.0.1", port=port, port_end=port + 50, silent=True)
    address = f"127.0.0.1:{tracker.port}"
    procs = []
    for i, share in enumerate(_shares(boards, sorted(os.sched_getaffinity(0)))):
        env = {**os.environ, "TVM_NUM_THREADS": str(len(share))}
        procs.append(subprocess.Popen(
            ["taskset", "-c", ",".join(map(str, share)), sys.executable, "-m", "hago.measure.board",
             "--tracker", address, "--key", KEY, "--host", "127.0.0.1", "--port", str(port + 100 + 10 * i),
             "--port-end", str(port + 109 + 10 * i)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 120
    while check_tracker(address).get(KEY, {}).get("free", 0) < boards:
        if time.monotonic() > deadline:
            raise RuntimeError("the board servers never registered")
        time.sleep(0.5)
    return tracker, address, procs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--boards", default="1,2,4")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--max-trials", type=int, default=8)
    p.add_argument("--algorithm", default="greedy")
    p.add_argument("--accuracy-drop", default="2%")
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    import torch

    import models
    from hago.hwspec import HardwareSpec
    from hago.measure.farm import FarmMeasurer
    from hago.search.algorithms import ALGORITHMS
    from hago.search.engine import SearchEngine

    torch.set_num_threads(bench.THREADS)
    model = models.build(args.model)
    inp = models.input_names(model)[0]
    views, _ = models.photo_views()
    calib = {inp: models.photo_crops(args.n_calib, seed=1)}
    evald = {inp: views}
    spec = HardwareSpec.load(DEVICE)
    cache = WORK / "cache"  # the reference (calibration, FP32 outputs) is computed by the first run only
    rows = []
    for n, boards in enumerate(int(b) for b in args.boards.split(",")):
        tracker, address, procs = _start_farm(boards, 11000 + 300 * n)
        try:
            log = WORK / f"search-{boards}.jsonl"
            log.unlink(missing_ok=True)
            shutil.rmtree(cache / "kernels", ignore_errors=True)
            farm = FarmMeasurer(address, KEY, spec, timeout_s=600, repeat=5, min_repeat_ms=100)
            t0 = time.perf_counter()
            engine = SearchEngine(model, spec, calib, evald, log_path=log, accuracy_drop=args.accuracy_drop,
                                  example_inputs=models.example_inputs(args.model, 1), max_trials=args.max_trials,
                                  cache_dir=cache, measurer=farm)
            setup = time.perf_counter() - t0
            t1 = time.perf_counter()
            result = engine.run(ALGORITHMS[args.algorithm])
            wall = time.perf_counter() - t1
            farm.close()
            rows.append({"boards": boards, "wall": wall, "setup": setup, "trials": result.trials,
                         "peak": farm.peak_busy, "board_s": farm.board_seconds, **engine.seconds,
                         "chosen": result.best.label if result.best else "-",
                         "ms": result.best.latency_ms if result.best else float("nan"), "met": result.met_target})
            print(rows[-1], flush=True)
        finally:
            for proc in procs:
                proc.kill()
            tracker.terminate()

    base = rows[0]["wall"]
    lines = ["| boards (cores each) | search wall s | speed-up | build s | accuracy s | waiting for boards s | "
             "board time s (all boards) | most boards busy at once | measurements | chosen build ms (its board) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cores = len(os.sched_getaffinity(0))
    for r in rows:
        share = cores if r["boards"] == 1 else max(1, cores // r["boards"]) if r["boards"] <= cores else "1, shared"
        lines.append(f"| {r['boards']} ({share}) | {r['wall']:.0f} | {base / r['wall']:.2f}x | {r['build']:.0f} | "
                     f"{r['accuracy']:.0f} | {r['measure wait']:.0f} | {r['board_s']:.0f} | {r['peak']} | "
                     f"{r['trials']} | {r['ms']:.3f} |")
    body = (f"## Farm search: {args.model} on {DEVICE}, 1/2/4 local boards\n\n"
            f"Command: `python benchmarks/farm_search.py --boards {args.boards} --max-trials {args.max_trials} "
            f"--algorithm {args.algorithm}` "
            f"({bench._stamp()}).\nMachine: {bench._machine()}.\n"
            f"{args.algorithm}, `--accuracy-drop {args.accuracy_drop}`, at most {args.max_trials} measurements; the engine's "
            f"set-up (reference cache warm after the first run) is not in the wall time. Each board is "
            f"`python -m hago.measure.board` under `taskset` with TVM_NUM_THREADS = its cores; the host's builds and "
            f"accuracy runs use the same {cores} cores.\n\n" + "\n".join(lines) + "\n")
    print(body)
    if not args.no_write:
        bench.write_results("farm-search", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
