"""Search benchmark: HAGO's greedy baseline against the cost-model-guided search.

For each algorithm, from a cold start (fresh log and kernel cache) and then
warm (same log: everything measured is reused), reports device measurements,
wall time (engine set-up, then search) and the latency and score of the
strategy returned. Metric: top-1 agreement with FP32 (no labels), as the issue
asks for ImageNet-class models. The FP32 reference outputs and calibration
statistics are cached per model and data (``work/search/<model>/cache/reference``),
so only the first run pays for them; its set-up time says so.

    python benchmarks/search.py --model mnist [--max-trials 40] [--no-write]
    python benchmarks/search.py --model resnet18 --n-eval 250 --n-calib 64 --no-write
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = HERE / "work" / "search"


def load(model: str, n_calib: int = 64, n_eval: int = 250):
    """(model, calib dict, eval dict without labels, example_inputs)."""
    import torch

    if model == "mnist":
        from hago import zoo

        xv, _ = zoo.mnist_data("valid")
        xt, _ = zoo.mnist_data("test")
        return zoo.mnist_cnn(), {"input": xv[:256]}, {"input": xt[:1000]}, (torch.from_numpy(xv[:1]),)
    import models  # benchmarks/models.py: the real networks

    return models.search_inputs(model, n_calib, n_eval)


def run(model_name: str, algorithm: str, max_trials: int, cold: bool, n_calib: int = 64, n_eval: int = 250,
        accuracy_drop: str = "1%", corrections: tuple[str, ...] = ("bias",)) -> dict:
    from hago.search.algorithms import ALGORITHMS
    from hago.search.engine import SearchEngine
    from hago.measure import LocalMeasurer

    work = WORK / model_name / algorithm
    cache = WORK / model_name / "cache"
    if cold:  # nothing reused: no log, no kernel timings, no FP32 reference outputs or calibration
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    model, calib, evald, example = load(model_name, n_calib, n_eval)
    t0 = time.perf_counter()
    e = SearchEngine(model, "x86-avx512-vnni", calib, evald, log_path=work / "search.jsonl",
                     accuracy_drop=accuracy_drop, example_inputs=example, max_trials=max_trials, cache_dir=cache,
                     measurer=LocalMeasurer(timeout_s=600, repeat=5, min_repeat_ms=100), corrections=corrections)
    t1 = time.perf_counter()
    r = e.run(ALGORITHMS[algorithm])
    e.measurer.close()
    row = {"algorithm": algorithm, "start": "cold" if cold else "warm", "trials": r.trials, "reused": r.reused,
            "setup_s": t1 - t0, "search_s": time.perf_counter() - t1,
            "seconds": time.perf_counter() - t0, "latency_ms": r.best.latency_ms if r.best else None,
            "score": r.best.accuracy if r.best else None, "met": r.met_target, "chosen": r.best.label if r.best else "-",
            "fp32_ms": r.fp32.latency_ms if r.fp32 else None, "space": e.space.size_text(),
            "evaluated": sum(1 for c in r.candidates if c.accuracy is not None),
            "point": r.best.point if r.best else None}
    print(row, flush=True)
    return row


def remeasure(model_name: str, rows: list[dict], max_trials: int, n_calib: int, n_eval: int, rounds: int = 3,
              accuracy_drop: str = "1%", corrections: tuple[str, ...] = ("bias",)) -> None:
    """Time every returned strategy again, interleaved, in one process: the shared machine's noise
    between runs minutes apart is larger than the differences between the answers."""
    from hago.search.engine import SearchEngine
    from hago.measure import LocalMeasurer

    points = sorted({r["point"] for r in rows if r["point"] is not None})
    model, calib, evald, example = load(model_name, n_calib, n_eval)
    tmp = WORK / model_name / "remeasure"
    shutil.rmtree(tmp, ignore_errors=True)
    e = SearchEngine(model, "x86-avx512-vnni", calib, evald, log_path=tmp / "search.jsonl", accuracy_drop=accuracy_drop,
                     example_inputs=example, cache_dir=WORK / model_name / "cache", corrections=corrections)
    import hago.build as build_mod

    libs = {p: build_mod.export(e.executable(p), e.spec, tmp / f"{i}.so") for i, p in enumerate(points)}
    m = LocalMeasurer(timeout_s=600, repeat=5, min_repeat_ms=100)
    times = {p: [] for p in points}
    for _ in range(rounds):
        for p in points:
            times[p].append(m.measure(libs[p], e._input_spec()).latency_ms)
    m.close()
    for r in rows:
        if r["point"] is not None:
            r["again_ms"] = float(np.median([t for t in times[r["point"]] if t is not None]))


def _ms(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def table(rows: list[dict]) -> str:
    out = ["| algorithm | start | device measurements | reused | accuracy evals | set-up s | search s | chosen | latency ms | re-timed ms | FP32 ms | agreement | met |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['algorithm']} | {r['start']} | {r['trials']} | {r['reused']} | {r['evaluated']} | "
                   f"{r['setup_s']:.0f} | {r['search_s']:.0f} | "
                   f"`{r['chosen']}` | {_ms(r['latency_ms'])} | {_ms(r.get('again_ms'))} | {_ms(r['fp32_ms'])} | {r['score']:.4f} | {r['met']} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mnist")
    p.add_argument("--max-trials", type=int, default=40)
    p.add_argument("--n-calib", type=int, default=64, help="calibration images (ImageNet nets)")
    p.add_argument("--n-eval", type=int, default=250, help="evaluation images (ImageNet nets)")
    p.add_argument("--runs", default="greedy:cold,greedy:warm,evolve:cold,evolve:warm",
                   help="algorithm:cold|warm, in order (a warm run resumes that algorithm's log)")
    p.add_argument("--accuracy-drop", default="1%", help="the search target, relative ('1%%') or absolute ('0.5pt')")
    p.add_argument("--corrections", default="bias",
                   help="per-layer corrections every candidate gets: bias, adaround,bias, adaround_conv,bias or none")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--remeasure", action="store_true",
                   help="time the returned strategies again, interleaved (the 're-timed' column)")
    args = p.parse_args()
    corrections = () if args.corrections == "none" else tuple(args.corrections.split(","))
    rows = []
    for spec in args.runs.split(","):
        algorithm, start = spec.split(":")
        rows.append(run(args.model, algorithm, args.max_trials, start == "cold", args.n_calib, args.n_eval,
                        args.accuracy_drop, corrections))
    if args.remeasure:
        remeasure(args.model, rows, args.max_trials, args.n_calib, args.n_eval, accuracy_drop=args.accuracy_drop,
                  corrections=corrections)
    text = table(rows)
    print(text)
    if not args.no_write:
        from run import _machine, write_results

        body = (f"## Search: greedy (HAGO) vs cost-model-guided, {args.model}, x86-avx512-vnni\n\n"
                f"Command: `python benchmarks/search.py --model {args.model} --max-trials {args.max_trials} "
                f"--accuracy-drop {args.accuracy_drop} --n-calib {args.n_calib} --n-eval {args.n_eval} --runs {args.runs} "
                f"--corrections {args.corrections}{' --remeasure' if args.remeasure else ''}` "
                f"({time.strftime('%Y-%m-%d')}). Machine: {_machine()}. Target: {args.accuracy_drop} drop in top-1 "
                f"agreement with FP32 on {'1000 MNIST test' if args.model == 'mnist' else args.n_eval} images; space of {rows[0]['space']} strategies; untuned kernels "
                f"(hand-written VNNI schedules); every candidate gets the corrections {args.corrections}.\n\n{text}\n")
        write_results(f"search-{args.model}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
