"""Search benchmark: HAGO's greedy baseline against the cost-model-guided search.

For each algorithm, from a cold start (fresh log and kernel cache) and then
warm (same log: everything measured is reused), reports device measurements,
wall time and the latency and score of the strategy returned. Metric: top-1
agreement with FP32 (no labels), as the issue asks for ImageNet-class models.

    python benchmarks/search.py --model mnist [--max-trials 40] [--no-write]
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


def load(model: str):
    """(model, calib dict, eval dict without labels, example_inputs)."""
    import torch

    if model == "mnist":
        from hago import zoo

        xv, _ = zoo.mnist_data("valid")
        xt, _ = zoo.mnist_data("test")
        return zoo.mnist_cnn(), {"input": xv[:256]}, {"input": xt[:1000]}, (torch.from_numpy(xv[:1]),)
    import models  # benchmarks/models.py: the real networks

    return models.search_inputs(model)


def run(model_name: str, algorithm: str, max_trials: int, cold: bool) -> dict:
    from hago.search.algorithms import ALGORITHMS
    from hago.search.engine import SearchEngine
    from hago.search.measure import LocalMeasurer

    work = WORK / model_name / algorithm
    if cold and work.exists():
        shutil.rmtree(work)
    model, calib, evald, example = load(model_name)
    t0 = time.perf_counter()
    e = SearchEngine(model, "x86-avx512-vnni", calib, evald, log_path=work / "search.jsonl",
                     accuracy_drop="1%", example_inputs=example, max_trials=max_trials, cache_dir=work / "cache",
                     measurer=LocalMeasurer(repeat=5, min_repeat_ms=100))
    r = e.run(ALGORITHMS[algorithm])
    return {"algorithm": algorithm, "start": "cold" if cold else "warm", "trials": r.trials, "reused": r.reused,
            "seconds": time.perf_counter() - t0, "latency_ms": r.best.latency_ms if r.best else None,
            "score": r.best.accuracy if r.best else None, "met": r.met_target, "chosen": r.best.label if r.best else "-",
            "fp32_ms": r.fp32.latency_ms if r.fp32 else None, "space": len(e.space)}


def table(rows: list[dict]) -> str:
    out = ["| algorithm | start | device measurements | reused | wall s | chosen | latency ms | FP32 ms | agreement | met |",
           "|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['algorithm']} | {r['start']} | {r['trials']} | {r['reused']} | {r['seconds']:.0f} | "
                   f"`{r['chosen']}` | {r['latency_ms']:.3f} | {r['fp32_ms']:.3f} | {r['score']:.4f} | {r['met']} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mnist")
    p.add_argument("--max-trials", type=int, default=40)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    rows = []
    for algorithm in ("greedy", "evolve"):
        rows.append(run(args.model, algorithm, args.max_trials, cold=True))
        rows.append(run(args.model, algorithm, args.max_trials, cold=False))
    text = table(rows)
    print(text)
    if not args.no_write:
        from run import _machine, write_results

        body = (f"## Search: greedy (HAGO) vs cost-model-guided, {args.model}, x86-avx512-vnni\n\n"
                f"Command: `python benchmarks/search.py --model {args.model} --max-trials {args.max_trials}` "
                f"({time.strftime('%Y-%m-%d')}). Machine: {_machine()}. Target: 1% relative drop in top-1 "
                f"agreement with FP32 on 1000 images; space of {rows[0]['space']} strategies; untuned kernels "
                f"(hand-written VNNI schedules).\n\n{text}\n")
        write_results(f"search-{args.model}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
