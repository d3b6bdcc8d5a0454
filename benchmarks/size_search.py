"""hago search under a weight-size budget on EfficientNet-Lite0: a mixed 4/8-bit build (issue 17's search figure).

The budget sits between the all-4-bit and the all-8-bit builds' realized weight
bytes (``--budget-at 0.5``: halfway), so neither end is an answer: all-8-bit is
over it and all-4-bit misses the accuracy target, a mean KL from FP32 on the
192 photo views (``--max-kl``; W8A8 with bias correction is about 0.012 there,
W4A8 by round to nearest about 3). ``--multipoint`` also offers every one-group
conv and the dense the ``4+`` choice (4-bit plus multipoint extra points).
Spec: ``x86-avx512-vnni`` (every integer layer on VNNI, 4-bit weights packed).
The front, the per-layer bits and the chosen build's size, KL, agreement and
latency go into RESULTS.md; ``pareto.png`` beside the log.

Corrections (``--corrections``, default ``gptq,bias``) run once per weight width, so each 4-bit layer
carries GPTQ's codes and each 8-bit layer its own.

    python benchmarks/size_search.py [--max-kl 0.03] [--budget-at 0.5] [--multipoint] [--max-trials 8]
                                     [--corrections gptq,bias] [--no-write]
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import argparse  # noqa: E402
import collections  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (RESULTS writer, machine line)

DEVICE = "x86-avx512-vnni"
WORK = HERE / "work" / "size_search"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--max-kl", type=float, default=0.03)
    p.add_argument("--budget-at", type=float, default=0.5,
                   help="the budget as a fraction of the way from all-4-bit to all-8-bit bytes")
    p.add_argument("--multipoint", action="store_true")
    p.add_argument("--max-trials", type=int, default=8)
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--corrections", default="gptq,bias",
                   help="local corrections, run once per weight width (4-bit layers get GPTQ's codes)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    import models
    from hago.evaluate import agreement, mean_kl, predict
    from hago.measure import LocalMeasurer
    from hago.search.algorithms import ALGORITHMS
    from hago.search.engine import SearchEngine
    from hago.search.run import write_search_outputs
    from hago.search.space import choice_label
    from hago.search.pareto import front
    from hago.weight_bytes import format_bytes

    model = models.build("efficientnet_lite0")
    inp = models.input_names(model)[0]
    views, _ = models.photo_views()
    corrections = tuple(c for c in args.corrections.split(",") if c)
    work = WORK / (("multipoint" if args.multipoint else "plain") + "-" + ("+".join(corrections) or "none"))
    calib = {inp: models.photo_crops(args.n_calib, seed=1)}
    common = dict(example_inputs=models.example_inputs("efficientnet_lite0", 1), metric="kl",
                  multipoint=args.multipoint, cache_dir=WORK / "cache", corrections=corrections)
    from hago.search.target import kl_target

    t0 = time.perf_counter()
    engine = SearchEngine(model, DEVICE, calib, {inp: views}, log_path=work / "search.jsonl",
                          accuracy_drop=kl_target(args.max_kl), max_trials=args.max_trials,
                          measurer=LocalMeasurer(timeout_s=600, repeat=5, min_repeat_ms=100), **common)
    # the budget from the two ends' realized bytes (a realize each, logged): set before the search starts
    lo, hi = engine.weight_bytes(engine.space.narrowest()), engine.weight_bytes(engine.space.widest())
    budget = engine.max_weight_bytes = int(lo + args.budget_at * (hi - lo))
    result = engine.run(ALGORITHMS["evolve"])
    engine.measurer.close()
    search_s = time.perf_counter() - t0
    out = work / "chosen"
    write_search_outputs(engine, result, out)
    best = result.best

    ref = engine._fp32_outputs(WORK / "cache")
    agree = None
    if best is not None:
        outputs = predict(engine.executable(best.point), engine.eval_samples, engine.names, engine.eval_batch,
                          static=True)
        agree, kl = agreement(outputs, ref), mean_kl(outputs, ref)
    ends = {"W8A8 (all 8-bit)": engine.candidate(engine.space.widest()),
            "W4A8 (all 4-bit)": engine.candidate(engine.space.narrowest())}
    lines = ["| build | weights | mean KL vs FP32 | latency ms |", "|---|---:|---:|---:|"]
    for name, c in ends.items():
        c = engine.accuracy(c.point) if c.accuracy is None else c
        lat = f"{c.latency_ms:.3f}" if c.latency_ms is not None else "not measured"
        lines.append(f"| {name} | {format_bytes(engine.weight_bytes(c.point))} | {-c.accuracy:.4f} | {lat} |")
    if best is not None:
        lines.append(f"| **hago search (chosen)** | {format_bytes(best.weight_bytes)} | {kl:.4f} | "
                     f"{best.latency_ms:.3f} |")
    per_layer = collections.Counter()
    layers = []
    if best is not None:
        for k, c in zip(engine.space.knobs, best.point):
            if k.kind == "weight":
                per_layer[choice_label(c)] += 1
                layers.append(f"{k.name} {choice_label(c)}")
    pareto = front(result.candidates, engine.max_weight_bytes)
    frontl = ["| front: build | weights | mean KL | latency ms |", "|---|---:|---:|---:|"]
    for c in sorted(pareto, key=lambda c: c.weight_bytes or 0):
        frontl.append(f"| {dict(collections.Counter(c.label.split()))} | {format_bytes(c.weight_bytes)} | "
                      f"{-c.accuracy:.4f} | {c.latency_ms:.3f} |")
    body = (f"## EfficientNet-Lite0: hago search under a weight budget{', with multipoint' if args.multipoint else ''}"
            f", {DEVICE}\n\n"
            f"Command: `python benchmarks/size_search.py --max-kl {args.max_kl:g} --budget-at {args.budget_at:g}"
            f"{' --multipoint' if args.multipoint else ''} --max-trials {args.max_trials} "
            f"--corrections {args.corrections}` ({bench._stamp()}).\n"
            f"Machine: {bench._machine()}.\n"
            f"Target: mean KL from FP32 <= {args.max_kl:g} on the {len(views)} photo views; budget "
            f"{format_bytes(budget)} of weights ({args.budget_at:.0%} of the way from all-4-bit to all-8-bit); "
            f"evolve, {result.trials} device measurements, {search_s:.0f} s in all; met: {result.met_target}"
            f" ({result.message}).\n\n" + "\n".join(lines) + "\n\n"
            + (f"Chosen build: weights per layer {dict(per_layer)}; top-1 agreement with FP32 {agree:.2%}. "
               f"Layers: {', '.join(layers)}.\n\n" if best is not None else "")
            + "\n".join(frontl) + "\n\n"
            + f"Front plot: `{(out / 'pareto.png').relative_to(HERE.parent)}` (not committed).\n")
    print(body)
    if not args.no_write:
        bench.write_results(f"size-search{'-multipoint' if args.multipoint else ''}", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
