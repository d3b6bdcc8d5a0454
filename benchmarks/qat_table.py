"""Top-1 at W4A4: post-training quantization (with and without its best correction) against plain QAT and SAQ.

    python benchmarks/qat_table.py [--models mnist,fashion] [--steps 300] [--n-eval 2000] [--n-calib 256]
        [--corrections bias,adaround_conv+bias,brecq+bias,lapq+bias,cle+bias_data_free] [--write]

Issue 18 asks whether training buys accuracy where post-training quantization loses it. Per model (``mnist``:
the bundled CNN, :mod:`hago.zoo`; ``fashion``: the ResNet of ``benchmarks/fashion.py`` on Debian's
Fashion-MNIST), on one seeded test subsample (``--n-eval``, the subsample ``accuracy_table.py`` draws):

* **FP32** top-1;
* **PTQ, first/last 8-bit**: ``accuracy_table.py``'s W4A4 setting (first and last weighted layers at 8-bit
  weights and inputs), round to nearest and every correction, run as hago's fake-quant twin as that table does;
  its cached rows are reused when they were computed on the same images;
* **PTQ, every layer 4-bit**: the bits the training uses (every weight W4, every activation A4, the image A8),
  round to nearest and every correction, the realized integer program run;
* **QAT / SAQ**: :mod:`hago.qat` fine-tunes the pretrained FP32 weights at those bits (``QuantConfig(4, 4, 8)``,
  the zero grid the export supports) for ``--steps`` steps of 64 (fixed seed, cosine lr), exports ONNX plus a
  strategy, and ``hago.compile(onnx, strategy=...)`` realizes and runs it; the table also gives the torch
  fake-quant model's top-1 and its argmax agreement with the realized program.

The training data is the training split (never a test image); calibration is ``accuracy_table.py``'s 256
training images. Before training, each model's quantized twin is exported once: a model ``hago.qat`` cannot
export (residual adds, for one) gets a row that says why instead of training rows. Rows are cached in
``benchmarks/work/qat_table/rows.json`` keyed by everything that decides them. ``--write`` puts the tables
into ``benchmarks/RESULTS.md`` under ``## QAT and SAQ at W4A4 (issue 18)``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts its pool: one thread, like accuracy_table

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import accuracy_table as at  # noqa: E402

WORK = HERE / "work" / "qat_table"
HEADING = "## QAT and SAQ at W4A4 (issue 18)"
DEVICE = at.DEVICE
CORRECTIONS = ("bias", "adaround_conv+bias", "brecq+bias", "lapq+bias", "cle+bias_data_free")
METHODS = ("qat", "saq")


def training_split(model: str) -> tuple[np.ndarray, np.ndarray]:
    """The labelled training split QAT and SAQ train on."""
    if model == "mnist":
        from hago.zoo import mnist_data

        return mnist_data("train")
    from fashion_data import fashion_mnist

    return fashion_mnist("train")


def calib_loss(net, model: str, calib: np.ndarray) -> float:
    """The FP32 model's mean cross-entropy on the calibration images (accuracy_table.load's seeded draw from
    the training split): how much gradient fine-tuning from these weights has to follow."""
    import torch

    x, y = training_split(model)
    idx = np.random.default_rng(0).permutation(len(x))[:len(calib)]
    assert np.array_equal(x[idx], calib), "accuracy_table.load draws its calibration images differently"
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(torch.from_numpy(calib)), torch.from_numpy(y[idx])))


def trainable(net):
    """``net`` with batch norms folded into their convs (the export refuses unfolded ones), as a copy."""
    import torch
    from torch.fx.experimental.optimization import fuse

    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    return fuse(copy.deepcopy(net).eval()) if has_bn else copy.deepcopy(net).eval()


def uniform_config(graph):
    """The bits ``hago.qat`` trains: every weight 4-bit, every activation 4-bit but the image (8-bit)."""
    from hago.annotate import AnnotateConfig

    first = next(n for n in graph.nodes if n.weighted)
    return AnnotateConfig(weight_bits=4, activation_bits=4,
                          edge_bits={e: 8 for e in at._edge_chain(graph, first.inputs[0])})


def uniform_row(prepared, corr: str, x: np.ndarray, y: np.ndarray, ref: np.ndarray) -> dict:
    """PTQ at the training's bits, the realized integer program run (the hago twin where realize refuses)."""
    import accuracy
    from hago.compiler import quantize, static_pair
    from hago.correct import corrected_graph
    from hago.hwspec import HardwareSpec
    from hago.simulate import simulate

    t = time.perf_counter()
    q = quantize(prepared, DEVICE, corrections=[] if corr == "none" else corr.split("+"),
                 annotate_config=uniform_config(prepared.graph))
    t_q = time.perf_counter() - t
    try:
        out, how = at.run(static_pair(q, HardwareSpec.load(DEVICE), at.BATCH)[1], x), "realized"
    except Exception as exc:  # noqa: BLE001 - say it and run the twin
        print(f"    realize failed ({type(exc).__name__}: {str(exc)[:200]}): simulated twin", flush=True)
        out, how = at.run(simulate(corrected_graph(q.graph, q.strategy), q.strategy), x), "simulated"
    bits = sorted({c.weight_bits for c in q.strategy.ops.values() if c.mode == "integer" and c.weight_bits})
    return {"top1": float((out.argmax(1) == y).mean()), "agree": accuracy.top1_agreement(out, ref),
            "quantize_s": round(t_q, 1), "weight_bits": bits, "run": how,
            "float_ops": len(q.strategy.float_ops())}


def export_problem(net, calib: np.ndarray, config) -> str | None:
    """Why ``hago.qat`` cannot export ``net`` (quantized, untrained), or None when it can."""
    import torch

    from hago.errors import HagoError
    from hago.qat import export, quantize_model

    model = quantize_model(trainable(net), torch.from_numpy(calib), config)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export(model, torch.from_numpy(calib[:1]), tmp, DEVICE, method="qat", calib=calib)
        except HagoError as exc:
            return f"{type(exc).__name__}: {exc}"
    return None


def qat_row(net, method: str, calib, xt, yt, x, y, ref, args, out_dir: Path) -> dict:
    """Fine-tune at W4A4 with ``method``, export, realize through ``hago.compile --strategy``, run on ``x``."""
    import torch

    import accuracy
    import hago
    from hago.qat import QuantConfig, TrainConfig, export, logits_of, quantize_model, top1, train

    torch.manual_seed(args.seed)
    model = quantize_model(trainable(net), torch.from_numpy(calib), QuantConfig(4, 4, 8, "zero"))
    t = time.perf_counter()
    losses = train(model, xt, yt, TrainConfig(method=method, steps=args.steps, batch=64, lr=args.lr,
                                                rho=args.rho, seed=args.seed))
    train_s = time.perf_counter() - t
    fake = logits_of(model, x)
    onnx_path, strategy_path = export(model, torch.from_numpy(calib[:1]), out_dir / method, DEVICE, method=method,
                                      calib=calib)  # calibrates the edges no trained layer reads (residual adds)
    result = hago.compile(str(onnx_path), DEVICE, strategy=str(strategy_path), measure=False,
                          eval_data={"input": x, "label": y})
    out = result.extras["eval_outputs"]["quantized"]
    return {"top1": float((out.argmax(1) == y).mean()), "agree": accuracy.top1_agreement(out, ref),
            "fake_top1": top1(fake, y), "int_vs_fake": float((out.argmax(1) == fake.argmax(1)).mean()),
            "train_s": round(train_s, 1), "final_loss": float(np.mean(losses[-20:])),
            "first_loss": float(np.mean(losses[:20])), "run": "realized"}


def best_correction(rows: dict, prefix: str) -> str | None:
    """The correction with the highest top-1 among ``prefix|corr`` rows (ties: the cheaper one)."""
    done = [(k.split("|", 1)[1], r) for k, r in rows.items() if k.startswith(prefix + "|") and not k.endswith("|none")]
    if not done:
        return None
    return max(done, key=lambda kr: (kr[1]["top1"], -kr[1]["quantize_s"]))[0]


def table(model: str, fp32: float, rows: dict, n_eval: int, args, problem: str | None, fp32_loss: float) -> str:
    lines = [f"**{model}** (FP32 top-1 {100 * fp32:.2f}%, {n_eval} test images, the seeded subsample of "
             f"accuracy_table.py): top-1 % / top-1 agreement with FP32 % / seconds (quantize for PTQ, "
             f"training for QAT and SAQ) / how it ran", "",
             "| method | bits | top-1 % | agree % | seconds | run |", "|---|---|---|---|---|---|",
             f"| FP32 | fp32 | {100 * fp32:.2f} | 100.0 | — | torch |"]
    settings = (("pinned", "W4A4, first/last layers W8 and A8 inputs", "simulated twin"),
                ("uniform", "W4A4 every layer, image A8 (QAT's bits)", None))
    notes = []
    for prefix, bits, run in settings:
        best = best_correction(rows, prefix)
        for corr, label in (("none", "PTQ, round to nearest"), (best, f"PTQ + best correction ({best})")):
            r = rows.get(f"{prefix}|{corr}")
            if r is None:
                continue
            lines.append(f"| {label} | {bits} | {100 * r['top1']:.2f} | {100 * r['agree']:.1f} | "
                         f"{r['quantize_s']:.0f} | {run or r.get('run', 'realized')} |")
        rtn, top = rows.get(f"{prefix}|none"), rows.get(f"{prefix}|{best}")
        if rtn and top and top["top1"] <= rtn["top1"]:
            notes.append(f"{bits}: no correction beats round to nearest on these images (best: {best})")
    for m in METHODS:
        name = {"qat": "plain QAT", "saq": f"SAQ (rho {args.rho})"}[m]
        r = rows.get(f"train|{m}")
        if problem is not None:
            lines.append(f"| {name} | W4A4 every layer, image A8 | — | — | — | "
                         "not run: hago.qat cannot export this model (see the notes) |")
        elif r is not None:
            lines.append(f"| {name}, {args.steps} steps | W4A4 every layer, image A8 | {100 * r['top1']:.2f} | "
                         f"{100 * r['agree']:.1f} | {r['train_s']:.0f} | realized via `hago.compile --strategy` "
                         f"(torch fake-quant {100 * r['fake_top1']:.2f}%, argmax agreement "
                         f"{100 * r['int_vs_fake']:.1f}%) |")
            notes.append(f"{name}: training loss {r['first_loss']:.3g} over the first 20 steps, "
                         f"{r['final_loss']:.3g} over the last 20")
    se = 100 * (fp32 * (1 - fp32) / n_eval) ** 0.5
    notes.insert(0, f"one test image is {100 / n_eval:.2f} points; the binomial standard error of a top-1 near "
                    f"FP32's is {se:.2f} points, so differences under about {2 * se:.1f} points are sampling noise")
    notes.append(f"the FP32 model's mean cross-entropy on the 256 calibration (training) images: {fp32_loss:.3g}")
    float_ops = sorted({r["float_ops"] for r in rows.values() if r.get("float_ops")})
    if float_ops:
        notes.append(f"PTQ rows keep {float_ops[-1]} ops in float (no integer form in hago, e.g. the global average "
                     "pool's mean)")
    if problem is not None:
        notes.append(f"no QAT/SAQ rows: with its batch norms folded (torch.fx fuse), the model takes hago.qat's "
                     f"fake-quant layers in torch, but `hago.qat.export` refuses it: `{problem}`")
    return "\n".join(lines) + "\n\nNotes: " + "; ".join(notes) + "."


def main() -> int:
    import torch

    from hago.pipeline import prepare_model
    from hago.qat import QuantConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mnist,fashion")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--corrections", default=",".join(CORRECTIONS))
    p.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    corrections = ["none"] + [c for c in args.corrections.split(",") if c and c != "none"]
    WORK.mkdir(parents=True, exist_ok=True)
    cache_path = WORK / "rows.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    theirs_path = at.WORK / "rows.json"
    theirs = json.loads(theirs_path.read_text()) if theirs_path.exists() else {}
    cmd = "python benchmarks/qat_table.py " + " ".join(sys.argv[1:])
    out, bases = {}, {}
    t_all = time.perf_counter()
    for model in args.models.split(","):
        net, calib, x, y, tag = at.load(model, args.n_calib, args.n_eval)
        ref = at.fp32_logits(net, x)
        fp32 = float((ref.argmax(1) == y).mean())
        print(f"{model}: FP32 top-1 {fp32:.4f} on {len(x)} test images", flush=True)
        prepared = prepare_model(net, calib, example_inputs=(torch.from_numpy(calib[:2]),))
        base = f"{model}|{tag}|{DEVICE}|calib{args.n_calib}|eval{len(x)}|threads1"
        rows = cache.setdefault(f"v1|{base}", {})
        bases[model] = base
        reused = theirs.get(f"v2|{base}", {})

        def keep(key, compute):
            if key not in rows:
                try:
                    t = time.perf_counter()
                    rows[key] = dict(compute())
                    rows[key]["wall_s"] = round(time.perf_counter() - t, 1)
                except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                    print(f"  {key}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    return
                cache_path.write_text(json.dumps(cache, indent=1))
            print(f"  {key}: {json.dumps(rows[key])}", flush=True)

        for c in corrections:
            if f"w4a4|{c}" in reused:  # accuracy_table's row on these very images
                rows[f"pinned|{c}"] = dict(reused[f"w4a4|{c}"], reused=True)
            keep(f"pinned|{c}", lambda c=c: at.row(prepared, "w4a4", c, x, y, ref))
        for c in corrections:
            keep(f"uniform|{c}", lambda c=c: uniform_row(prepared, c, x, y, ref))
        problem = export_problem(net, calib, QuantConfig(4, 4, 8, "zero"))
        if problem:
            print(f"  hago.qat export refuses {model}: {problem}", flush=True)
        else:
            xt, yt = training_split(model)
            run_key = f"steps{args.steps}|lr{args.lr}|rho{args.rho}|seed{args.seed}"
            for m in METHODS:
                key = f"train|{m}"
                if rows.get(key, {}).get("config") != run_key:
                    rows.pop(key, None)
                keep(key, lambda m=m: dict(qat_row(net, m, calib, xt, yt, x, y, ref, args, WORK / model),
                                           config=run_key))
        out[model] = table(model, fp32, rows, len(x), args, problem, calib_loss(net, model, calib))
    elapsed = time.perf_counter() - t_all
    wall = sum(r.get("wall_s", 0) for k in out for r in cache[f"v1|{bases[k]}"].values())
    header = (f"`{cmd}` ({DEVICE}; torch and TVM on 1 thread; the rows took {wall / 60:.1f} min to compute, "
              f"this invocation {elapsed / 60:.1f} min). Calibration: 256 training images. QAT/SAQ: the pretrained "
              "FP32 weights fine-tuned on the training split, batch 64, SGD momentum 0.9, cosine lr, per-channel "
              "4-bit weights on the zero grid (-7..7), learnable clips, exported as ONNX + strategy.json and "
              "replayed by `hago.compile --strategy`; the realized program keeps 4-bit activation codes in 8-bit "
              "VNNI containers (the same integers a 4-bit datapath would compute). 'best correction' is picked on "
              "these test images, so it flatters PTQ.")
    print("\n" + header + "\n\n" + "\n\n".join(out.values()))
    if args.write:
        write_results(header, out)
    return 0


def write_results(header: str, tables: dict[str, str]) -> None:
    """accuracy_table's replace-or-append writer, pointed at this section's heading."""
    saved = at.HEADING
    at.HEADING = HEADING
    try:
        at.write_results(header, tables)
    finally:
        at.HEADING = saved


if __name__ == "__main__":
    sys.exit(main())
