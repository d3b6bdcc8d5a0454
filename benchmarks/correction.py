"""Accuracy plug-ins on EfficientNet-Lite0: agreement and KL with and without them.

    python benchmarks/correction.py [--n-calib 128] [--eval photos|crops] [--n-eval 300] [--corrections none,bias]
                                    [--simulated] [--ablate weights,acts,dw,pw] [--noise-floor] [--threads 2]

Calibration on ``photo_crops(n_calib, seed=1)``; evaluation (``--eval``) on whole photographs
and their mirror images (``photo_views``, none of them a calibration photo: what
``benchmarks/run.py`` reports) or on ``photo_crops(n_eval, seed=2)``. FP32 reference from PyTorch. For each setting it prints
top-1 agreement, mean KL and top-5 overlap of the realized integer program, the same restricted
to crops whose FP32 top-1 probability margin is large (the ambiguous-crop study), and with
``--simulated`` how often the fake-quant twin (``hago.simulate``) and the integer program agree.
``--ablate`` runs the fake-quant twin of each setting with only part of it quantized: ``weights``
(activations float), ``acts`` (weights float), ``dw`` (depthwise weights only), ``pw`` (the other
weights only), to show where the error comes from. Outputs are cached under ``benchmarks/work/correction/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = HERE / "work" / "correction"
DEVICE = "x86-avx512-vnni"
MODEL = "efficientnet_lite0"


def _run(mod, x: np.ndarray, batch: int) -> np.ndarray:
    import tvm
    from tvm import relax

    from hago import build as build_mod

    ex = build_mod.build(build_mod.static_batch(mod, batch), build_mod.host_target(), "host")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        n = len(xb)
        if n < batch:
            xb = np.concatenate([xb, np.zeros((batch - n, *xb.shape[1:]), xb.dtype)])
        outs.append(vm["main"](tvm.runtime.tensor(np.ascontiguousarray(xb))).numpy()[:n])
    return np.concatenate(outs)


WEIGHTED = ("conv2d", "depthwise_conv2d", "dense")


def _ablated(strategy, part: str):
    """A copy of ``strategy`` quantizing only ``part``: weights | acts | dw | pw (see the docstring)."""
    import copy

    s = copy.deepcopy(strategy)
    if part != "acts":  # activations float
        for e in s.edges.values():
            e.bits = 0
    for o in s.ops.values():
        if o.kind not in WEIGHTED:
            continue
        if part == "acts" or (part == "dw" and o.kind != "depthwise_conv2d") or (
                part == "pw" and o.kind == "depthwise_conv2d"):
            o.mode = "float"  # the twin keeps this layer's weights float
    return s


def _noise_floor(model, x: np.ndarray, ref: np.ndarray) -> dict:
    """How often FP32 itself changes its top-1 when a crop changes imperceptibly.

    ``uint8``: the crop stored as an 8-bit image (each value rounded to 1/255 of the
    range, at most half a grey level); ``shift``: moved one pixel right (edge column
    repeated). An INT8 build cannot be expected to agree with FP32 more often than
    FP32 agrees with itself under such changes.
    """
    import torch

    import accuracy

    pixels = np.round((x * 0.5 + 0.5) * 255.0) / 255.0
    as_uint8 = ((pixels - 0.5) / 0.5).astype(np.float32)
    shifted = np.concatenate([x[..., :1], x[..., :-1]], axis=-1)
    out = {}
    for name, xp in (("uint8", as_uint8), ("shift", shifted)):
        with torch.no_grad():
            y = np.concatenate([model(torch.from_numpy(np.ascontiguousarray(xp[i:i + 50]))).numpy()
                                for i in range(0, len(xp), 50)])
        out[name] = accuracy.classifier_metrics(y, ref)
    return out


def _input_grid(model, x: np.ndarray, ref: np.ndarray, strategy) -> dict:
    """FP32 on the input rounded to the INT8 build's own uint8 input grid: the ceiling of any build that quantizes its input."""
    import torch

    import accuracy

    qp = next(e.qparams for name, e in strategy.edges.items() if name.startswith("input:"))
    q = np.clip(np.round(x / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)
    xq = ((q - qp.zero_point) * qp.scale).astype(np.float32)
    with torch.no_grad():
        y = np.concatenate([model(torch.from_numpy(np.ascontiguousarray(xq[i:i + 50]))).numpy()
                            for i in range(0, len(xq), 50)])
    return accuracy.classifier_metrics(y, ref)


def main() -> int:
    import torch

    import accuracy
    import models
    from hago.compiler import quantize, static_pair
    from hago.correct import corrected_graph
    from hago.hwspec import HardwareSpec
    from hago.simulate import simulate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--n-eval", type=int, default=300, help="crops evaluated with --eval crops")
    p.add_argument("--eval", choices=("photos", "crops"), default="photos",
                   help="photos: whole photographs and their mirror images (models.photo_views); "
                        "crops: random crops of the calibration photos (the session-3/4 study)")
    p.add_argument("--corrections", default="none,bias",
                   help="comma list of settings; a setting is none or plug-ins joined by + (adaround+bias)")
    p.add_argument("--calibrator", default="mse")
    p.add_argument("--simulated", action="store_true", help="also run the fake-quant twin")
    p.add_argument("--ablate", default="", help="comma list of weights, acts, dw, pw (fake-quant twin)")
    p.add_argument("--noise-floor", action="store_true",
                   help="FP32 against FP32 on imperceptibly changed inputs (stored as 8-bit; shifted 1 pixel; "
                        "rounded to the INT8 build's input grid)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)

    model = models.build(MODEL)
    inp = models.input_names(model)[0]
    calib = {inp: models.photo_crops(args.n_calib, seed=1)}
    if args.eval == "photos":
        x, names = models.photo_views()
        tag = f"photos{len(x)}"  # names the cached files
        print(f"{len(x)} views of {len({n.split('|')[0] for n in names})} photos", flush=True)
    else:
        x = models.photo_crops(args.n_eval, seed=2)
        tag = str(args.n_eval)
    ref_path = WORK / f"fp32_{tag}.npy"
    if ref_path.exists():
        ref = np.load(ref_path)
    else:
        with torch.no_grad():
            ref = np.concatenate([model(torch.from_numpy(x[i:i + 50])).numpy() for i in range(0, len(x), 50)])
        np.save(ref_path, ref)
    print("FP32 margin study:", json.dumps(accuracy.margin_summary(ref)), flush=True)

    results = {"fp32_margins": accuracy.margin_summary(ref)}
    if args.noise_floor:
        results["fp32_noise_floor"] = _noise_floor(model, x, ref)
        print("FP32 noise floor:", json.dumps(results["fp32_noise_floor"]), flush=True)
    for corr in args.corrections.split(","):
        t = time.perf_counter()
        corrections = [] if corr == "none" else corr.split("+")
        q = quantize(model, DEVICE, calib, example_inputs=models.example_inputs(MODEL), batch_size=8,
                     calibrator=args.calibrator, corrections=corrections)
        t_q = time.perf_counter() - t
        if args.noise_floor and "fp32_input_grid" not in results:
            results["fp32_input_grid"] = _input_grid(model, x, ref, q.strategy)
            print("FP32 on the INT8 input grid:", json.dumps(results["fp32_input_grid"]), flush=True)
        _, int_mod = static_pair(q, HardwareSpec.load(DEVICE), args.batch)  # the realized integer program
        out = _run(int_mod, x, args.batch)
        row = {"quantize_s": round(t_q, 1), **accuracy.classifier_metrics(out, ref),
               **accuracy.agreement_by_margin(out, ref)}
        if args.simulated:
            sim = _run(simulate(corrected_graph(q.graph, q.strategy), q.strategy), x, args.batch)
            row["sim"] = accuracy.classifier_metrics(sim, ref)
            row["sim_vs_int_top1"] = accuracy.top1_agreement(sim, out)
            row["sim_vs_int_mean_abs_logit"] = float(np.abs(sim - out).mean())
            row["int_vs_fp32_mean_abs_logit"] = float(np.abs(ref - out).mean())
        for part in filter(None, args.ablate.split(",")):
            sim = _run(simulate(corrected_graph(q.graph, q.strategy), _ablated(q.strategy, part)), x, args.batch)
            row[f"ablate_{part}"] = accuracy.classifier_metrics(sim, ref)
        q.strategy.save(WORK / f"strategy_{corr}_{args.calibrator}_{args.n_calib}.json")
        np.save(WORK / f"int_{corr}_{args.calibrator}_{args.n_calib}_{tag}.npy", out)
        results[corr] = row
        print(corr, json.dumps(row), flush=True)
    path = WORK / f"results_{args.calibrator}_{args.n_calib}_{tag}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
