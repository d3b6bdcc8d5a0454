"""hago bf16 against the FP32 and bf16 peers, timed in interleaved rounds on a drifting machine.

    python benchmarks/bf16_interleaved.py [--model efficientnet_lite0] [--rounds 8] [--block-calls N]

``run.py`` times its rows one after another; on a shared machine whose speed drifts by up to 1.8x over
minutes (session 13's EPYC) a row measured in a slow phase looks slow. Here every build is timed once per
round, in turn (``run.py``'s ``_median_ms``, 1 s a build), for ``--rounds`` rounds, each round opened by the
next build (the first build of a round timed up to 9% slower in session 14's A/B runs), and each build's median
over the rounds is reported with its ratio to hago bf16, so every ratio comes from the same minutes.
Builds: hago FP32 and hago bf16 (``run.py``'s bf16 spec for this CPU), ONNX Runtime FP32, OpenVINO FP32
and bf16 on the FP32 ONNX file. On the pretrained EfficientNet-Lite0 each build is also scored against PyTorch
FP32 on the 192 photo views (top-1 agreement, mean KL), after the timing.

``--block-calls N``: each build's turn in a round is one warm-up call and ``N`` timed calls (their median)
instead of ``run.py``'s 1 s. With N = 20 a round takes ~0.2 s, so a few hundred rounds fit in a minute
and the builds being compared are timed within milliseconds of each other, each on warm caches (every
build runs back to back within its turn, as it does when deployed). Session 16 found the 1 s turns'
per-round ratios spread 0.77-1.18x on MobileNetV2, from the machine's drift alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0", choices=["efficientnet_lite0", "mobilenetv2", "resnet18"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--block-calls", type=int, default=None,
                   help="time each build's turn as the median of this many calls (after one warm-up call) instead "
                        "of run.py's 1 s; use with a few hundred --rounds")
    args = p.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "2")  # run.py's THREADS, before TVM's thread pool starts

    import torch

    import models
    import run

    torch.set_num_threads(run.THREADS)
    model, example = models.build(args.model), models.example_inputs(args.model)
    inp = models.input_names(model)[0]
    calib = {inp: models.photo_crops(32, seed=1)}
    wd = run.WORK / f"{args.model}_bf16_interleaved"
    res, _ = run._hago_build(model, example, calib, wd / "build", batch_size=8, corrections=())
    bf16 = run._hago_bf16_build(model, example, calib, wd / "build_bf16", batch_size=8)
    if bf16 is None:
        print(f"no hago bf16 build on this CPU ({run.BF16_DEVICE} cannot run here)")
        return 1
    onnx_fp32 = run._export_onnx(model, example, [inp], wd / f"{args.model}.onnx")
    feeds = {inp: calib[inp][:1]}
    fns = {"hago FP32": run._tvm_fn(res.fp32_executable), run.HAGO_BF16: run._tvm_fn(bf16.int_executable),
           run.ORT_FP32: run._ort_fn(onnx_fp32)}
    fns.update({name: run._ov_fn(c) for name, c in run._openvino_fp32_peers(onnx_fp32).items()})
    times = {name: [] for name in fns}
    order = list(fns)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:  # each build opens a round in turn
            times[name].append(run._median_ms(lambda: fns[name](feeds)) if args.block_calls is None
                               else _block_ms(lambda: fns[name](feeds), args.block_calls))
        if args.block_calls is None or (r + 1) % 50 == 0 or r + 1 == args.rounds:
            print(f"round {r + 1}: " + ", ".join(f"{n.split(' (')[0]} {t[-1]:.2f}" for n, t in times.items()),
                  flush=True)
    scores = _scores(args.model, model, inp, fns)
    base = np.asarray(times[run.HAGO_BF16])
    turn = "1 s" if args.block_calls is None else f"the median of {args.block_calls} calls"
    print(f"\n{args.model}, batch 1, {run.THREADS} threads, {args.rounds} interleaved rounds, each build's turn "
          f"{turn} ({run._machine()})\n")
    acc = " top-1 agreement / mean KL vs FP32 |" if scores else ""
    print(f"| build | median ms | its time / hago bf16's, per round: median (quartiles; min-max) |{acc}\n"
          f"|---|---:|---:|{'---:|' if scores else ''}")
    for name, t in times.items():
        ratio = np.asarray(t) / base  # each round's pair measured within seconds of each other
        cell = f" {scores[name][0]:.1%} / {scores[name][1]:.4f} |" if scores else ""
        q1, q3 = np.percentile(ratio, [25, 75])
        print(f"| {name} | {np.median(t):.3f} | {np.median(ratio):.3f}x ({q1:.3f}-{q3:.3f}; "
              f"{ratio.min():.2f}-{ratio.max():.2f}) |{cell}")
    return 0


def _block_ms(fn, calls: int) -> float:
    """Median milliseconds of ``calls`` back-to-back calls of ``fn``, after one untimed call."""
    import time

    fn()
    t = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        t.append(time.perf_counter() - start)
    return float(np.median(t)) * 1e3


def _scores(name: str, model, inp: str, fns: dict) -> dict:
    """Per build (top-1 agreement, mean KL) against PyTorch FP32 on the photo views, for the pretrained
    EfficientNet-Lite0 (the others have random weights: latency only); {} otherwise."""
    if name != "efficientnet_lite0":
        return {}
    import accuracy
    import models
    import run

    views, _ = models.photo_views()
    x = {inp: views}
    ref = run._run_batched(run._torch_fn(model), x, 50)
    out = {}
    for build, fn in fns.items():
        m = accuracy.classifier_metrics(run._run_batched(fn, x, 1), ref)
        out[build] = (m["top1_agreement"], m["mean_kl"])
    return out


if __name__ == "__main__":
    sys.exit(main())
