"""Multipoint against 8-bit promotion, one layer of EfficientNet-Lite0 at a time (issue 18's figure).

Start from W8A8 on ``x86-avx512-vnni`` (packed 4-bit weights on VNNI) and
take one layer down to 4 bits: the question the search asks of a layer that
4-bit weights hurt is whether to give it extra points or 8 bits back. For
each of the ``--layers`` largest and the ``--early`` first layers that take
extra points (one-group convs and the dense; the stem excluded), three
programs that differ in that layer only:

* ``4``: the layer at 4 bits, the rest 8-bit;
* ``4+``: the layer at 4 bits with multipoint extra points (hago search's
  ``4+`` choice: a tenth more output channels in the same kernel, filled up
  to the kernel's 16-channel block, and a weighted sum before requantize);
* ``8``: the layer promoted back to 8 bits (the W8A8 build).

Each gets its mean KL and top-1 agreement against FP32 on the 192 photo views,
its weight bytes (realized program), the time of the layer's own kernels
(the calls whose signature the base build does not have, median of
``--runs`` profiled runs) and the whole model's median latency (interleaved
rounds). Everything goes through the search engine's own candidates, so the
numbers are what ``hago search --multipoint`` weighs.

    python benchmarks/multipoint_layer.py [--layers 3] [--rounds 3] [--no-write]
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import argparse  # noqa: E402
import collections  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (medians, RESULTS writer, machine line)

DEVICE = "x86-avx512-vnni"
WORK = HERE / "work" / "multipoint_layer"


def _layer_ms(profile: list[tuple[str, float]], base: list[tuple[str, float]]) -> float:
    """Milliseconds of the calls in ``profile`` that the base build does not make (the changed layer's)."""
    left = collections.Counter(s for s, _ in base)
    total = 0.0
    for sig, ms in profile:
        if left[sig] > 0:
            left[sig] -= 1
        else:
            total += ms
    return total


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2, help="how many of the largest layers to try")
    p.add_argument("--early", type=int, default=2, help="how many of the first layers (after the stem) to try")
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved whole-model timing rounds")
    p.add_argument("--runs", type=int, default=30, help="profiled runs for the per-kernel medians")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    import tvm
    from tvm import relax

    import models
    from hago.evaluate import agreement, mean_kl, predict
    from hago.measure import LocalMeasurer
    from hago.search.engine import SearchEngine
    from hago.search.kernelcache import profile_calls
    from hago.search.points import BUDGET
    from hago.search.space import MULTIPOINT, is_multipoint
    from hago.search.target import kl_target

    model = models.build("efficientnet_lite0")
    inp = models.input_names(model)[0]
    views, _ = models.photo_views()
    t0 = time.perf_counter()
    engine = SearchEngine(model, DEVICE, {inp: models.photo_crops(args.n_calib, seed=1)}, {inp: views},
                          log_path=WORK / "search.jsonl", metric="kl", accuracy_drop=kl_target(0.5),
                          example_inputs=models.example_inputs("efficientnet_lite0", 1), multipoint=True,
                          cache_dir=WORK / "cache", measurer=LocalMeasurer(timeout_s=600))
    setup_s = time.perf_counter() - t0
    space = engine.space
    weight = [i for i, k in enumerate(space.knobs) if k.kind == "weight"]
    base = space.widest()  # W8A8
    size = {i: engine.graph.node(space.knobs[i].name).weight.size for i in weight[1:]
            if any(map(is_multipoint, space.knobs[i].choices))}
    chosen = list(dict.fromkeys(sorted(size)[:args.early] + sorted(size, key=size.get, reverse=True)[:args.layers]))

    ref = engine._fp32_outputs(WORK / "cache")
    x1 = [tvm.runtime.tensor(views[:1])]
    rows, vms = [], {}  # vms: one VM per distinct build, timed side by side

    def variant(point):
        ex = engine.executable(point)
        out = predict(ex, engine.eval_samples, engine.names, engine.eval_batch, static=True)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        return {"kl": mean_kl(out, ref), "agree": agreement(out, ref), "bytes": engine.weight_bytes(point),
                "profile": profile_calls(vm, x1, runs=args.runs), "vm": vm}

    base_v = variant(base)
    vms["W8A8"] = base_v["vm"]
    for i in chosen:
        node = engine.graph.node(space.knobs[i].name)
        shape = "x".join(str(d) for d in node.weight.shape)
        narrow, with_points = (variant(tuple(c if j == i else b for j, b in enumerate(base)))
                               for c in (4, MULTIPOINT + 4))
        layer = f"{node.name} ({node.kind} {shape})"
        # the layer's own calls: in W8A8, those the 4-bit build does not make; else those W8A8 does not
        for name, v, layer_ms in (("4", narrow, _layer_ms(narrow["profile"], base_v["profile"])),
                                  ("4+", with_points, _layer_ms(with_points["profile"], base_v["profile"])),
                                  ("8", base_v, _layer_ms(base_v["profile"], narrow["profile"]))):
            timer = "W8A8" if name == "8" else f"{node.name} {name}"
            vms[timer] = v["vm"]
            rows.append({"layer": layer, "choice": name, "kl": v["kl"], "agree": v["agree"], "bytes": v["bytes"],
                         "layer_ms": layer_ms, "timer": timer})

    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, vm in vms.items():
            times[name].append(bench._median_ms(lambda vm=vm: vm["main"](*x1)))
    ms = {name: float(np.median(v)) for name, v in times.items()}
    base_ms = ms["W8A8"]
    for r in rows:
        r["model_ms"] = ms[r["timer"]]

    lines = ["| layer | weights | layer's kernels ms | model ms | weight bytes | mean KL vs FP32 | top-1 agreement |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['choice']} | {r['layer_ms']:.3f} | {r['model_ms']:.3f} | "
                     f"{r['bytes'] / 1e6:.3f} MB | {r['kl']:.4f} | {r['agree']:.2%} |")
    body = (f"## Multipoint against 8-bit promotion, one EfficientNet-Lite0 layer at a time, {DEVICE}\n\n"
            f"Command: `python benchmarks/multipoint_layer.py --layers {args.layers} --early {args.early}` "
            f"({bench._stamp()}).\n"
            f"Machine: {bench._machine()}.\n"
            f"Base: W8A8 with bias correction (the search's: computed at 8 bits, so a 4-bit layer gets none), "
            f"calibration on {args.n_calib} crops; each layer in turn: `4` that layer at 4 bits, `4+` with "
            f"multipoint extra points ({BUDGET:.0%} of its output channels rounded up to the 16-channel block, "
            f"`hago search --multipoint`'s choice), `8` W8A8 itself. \"layer's kernels\": median over "
            f"{args.runs} profiled runs of the calls the two other builds do not share; model ms: median of "
            f"{args.rounds} interleaved rounds. W8A8: mean KL {base_v['kl']:.4f}, agreement "
            f"{base_v['agree']:.2%}, {base_v['bytes'] / 1e6:.3f} MB, {base_ms:.3f} ms. Engine set-up "
            f"(calibration, points fitted once for every layer): {setup_s:.0f} s.\n\n" + "\n".join(lines) + "\n")
    print(body)
    if not args.no_write:
        bench.write_results("multipoint-layer", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
