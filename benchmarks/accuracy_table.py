"""Top-1 on labelled test sets at W8A8, W4A8 and simulated W4A4, round to nearest against each accuracy plug-in.

    python benchmarks/accuracy_table.py [--models mnist,fashion] [--settings w8a8,w4a8,w4a4]
        [--corrections none,bias,adaround_conv+bias,brecq+bias,lapq+bias,cle+bias_data_free]
        [--n-calib 256] [--n-eval 10000] [--threads 1] [--write]

Models: ``mnist`` (the bundled pretrained CNN, :mod:`hago.zoo`, MNIST test set) and ``fashion`` (the ResNet
trained here, ``benchmarks/fashion.py``, Fashion-MNIST test set). Calibration: the first ``--n-calib`` images
of a seeded permutation of each training set (never a test image). Settings, on ``x86-avx512-vnni``:

* ``w8a8``: 8-bit weights and activations, the realized integer program run;
* ``w4a8``: 4-bit weights except the first and last weighted layers (8-bit, as the literature does),
  8-bit activations, the realized integer program run;
* ``w4a4``: as ``w4a8`` with 4-bit activations too, except the inputs of the first and last layers (8-bit);
  no x86 instruction multiplies 4-bit activations, so it is run as hago's fake-quant twin (:mod:`hago.simulate`);
* ``w4a8all``: every weighted layer at 4-bit weights (first and last too), 8-bit activations, realized:
  where round to nearest loses accuracy on a model that shrugs off 4-bit middle layers.
* ``w4a8dw8`` / ``w4a8pw8``: ``w4a8`` with the depthwise convs' weights at 8 bits (only the 1x1 convs and
  dense at 4), or with every weighted layer but the depthwise convs at 8 (only those at 4): which kind of
  layer a W4A8 error comes from.
* ``w5a8`` / ``w6a8``: as ``w4a8`` with 5- or 6-bit weights (codes in int8, the 8-bit kernels): how many
  bits a per-layer method's 4-bit result is worth, and how many bits an accuracy goal asks for.

``quantize_s`` is the wall time of ``hago.compiler.quantize`` (calibration, the corrections, realize) on the
thread count given. Rows are cached in ``benchmarks/work/accuracy_table/rows.json`` (keyed by everything that
decides them), so an interrupted run resumes. With ``--write`` the table goes into ``benchmarks/RESULTS.md``
under ``## Accuracy at 8 and 4 bits (issue 17)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tvm_threads import from_argv  # noqa: E402

THREADS = from_argv()  # before TVM is imported: it reads its thread count once

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "accuracy_table"
RESULTS = HERE / "RESULTS.md"
HEADING = "## Accuracy at 8 and 4 bits (issue 17)"
DEVICE = "x86-avx512-vnni"
SETTINGS = ("w8a8", "w4a8", "w4a4", "w4a8all", "w4a8dw8", "w4a8pw8", "w5a8", "w6a8")
DEFAULT_SETTINGS = SETTINGS[:4]  # the table's columns; the rest split W4A8 by kind of layer or widen its weights
CORRECTIONS = ("none", "bias", "gptq+bias", "adaround_conv+bias", "brecq+bias", "lapq+bias", "cle+bias_data_free")
BATCH = 250
LABELS = {"w8a8": "W8A8", "w4a8": "W4A8", "w4a4": "W4A4 (simulated)", "w4a8all": "W4A8, first/last 4-bit too",
          "w4a8dw8": "W4A8, depthwise 8-bit", "w4a8pw8": "W4A8, only depthwise 4-bit", "w5a8": "W5A8",
          "w6a8": "W6A8"}


def load(name: str, n_calib: int, n_eval: int):
    """``(torch model, calibration images, test images, test labels, tag)`` for ``mnist`` or ``fashion``."""
    if name == "mnist":
        from hago.zoo import mnist_cnn, mnist_data

        net, (xt, _), (x, y), tag = mnist_cnn(), mnist_data("train"), mnist_data("test"), "ccexam"
    elif name == "fashion":
        import fashion
        from fashion_data import fashion_mnist

        net, (xt, _), (x, y) = fashion.fashion_cnn(), fashion_mnist("train"), fashion_mnist("test")
        tag = fashion.config_hash()
    elif name == "efficientnet_lite0":  # the pretrained ImageNet net on photo views: no labels, so KL/agreement
        import models

        net = models.build(name)
        views, _ = models.photo_views()
        return net, models.photo_crops(n_calib, seed=1), np.ascontiguousarray(views), None, "photos"
    else:
        raise SystemExit(f"unknown model {name}: mnist, fashion or efficientnet_lite0")
    calib = xt[np.random.default_rng(0).permutation(len(xt))[:n_calib]]
    if n_eval < len(x):  # a seeded, class-blind subsample of the test set
        keep = np.sort(np.random.default_rng(1).permutation(len(x))[:n_eval])
        x, y = x[keep], y[keep]
    return net, np.ascontiguousarray(calib), np.ascontiguousarray(x), y, tag


def pinned_config(graph, setting: str):
    """The setting's AnnotateConfig: first and last weighted layers' weights (and, at A4, inputs) at 8 bits."""
    from hago.annotate import AnnotateConfig

    if setting == "w8a8":
        return AnnotateConfig()
    if setting == "w4a8all":
        return AnnotateConfig(weight_bits=4)
    weighted = [n for n in graph.nodes if n.weighted]
    ends = (weighted[0], weighted[-1])
    node_bits = {n.name: 8 for n in ends}
    if setting in ("w4a8dw8", "w4a8pw8"):
        depthwise = setting == "w4a8dw8"
        node_bits.update({n.name: 8 for n in weighted if (n.kind == "depthwise_conv2d") == depthwise})
    if setting in ("w4a8", "w4a8dw8", "w4a8pw8"):
        return AnnotateConfig(weight_bits=4, node_weight_bits=node_bits)
    if setting in ("w5a8", "w6a8"):
        return AnnotateConfig(weight_bits=int(setting[1]), node_weight_bits=node_bits)
    return AnnotateConfig(weight_bits=4, activation_bits=4, node_weight_bits=node_bits,
                          edge_bits={s: 8 for n in ends for e in n.inputs for s in _edge_chain(graph, e)})


def _edge_chain(graph, edge: str) -> list[str]:
    """``edge`` and the edges behind it through passthrough ops (relu, pool, reshape): whichever of them
    annotate quantizes (an integer passthrough shares its input's edge, a float one quantizes its own output)."""
    from hago.graph import PASSTHROUGH

    by_name = {n.name: n for n in graph.nodes}
    chain = [edge]
    while edge in by_name and by_name[edge].kind in PASSTHROUGH and by_name[edge].inputs:
        edge = by_name[edge].inputs[0]
        chain.append(edge)
    return chain


def run(mod, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """Build ``mod`` for this machine at a static batch and run it over ``x`` (correction.py's runner)."""
    from correction import _run

    return _run(mod, x, batch)


def fp32_logits(net, x: np.ndarray, batch: int = 500) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([net(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


def row(prepared, setting: str, corr: str, x: np.ndarray, y: np.ndarray, ref: np.ndarray) -> dict:
    import accuracy
    from hago.compiler import quantize, static_pair
    from hago.correct import corrected_graph
    from hago.hwspec import HardwareSpec
    from hago.simulate import simulate

    corrections = [] if corr == "none" else corr.split("+")
    t = time.perf_counter()
    q = quantize(prepared, DEVICE, corrections=corrections, annotate_config=pinned_config(prepared.graph, setting))
    t_q = time.perf_counter() - t
    if setting == "w4a4":
        out = run(simulate(corrected_graph(q.graph, q.strategy), q.strategy), x)
    else:
        out = run(static_pair(q, HardwareSpec.load(DEVICE), BATCH)[1], x)
    bits = sorted({c.weight_bits for c in q.strategy.ops.values() if c.mode == "integer" and c.weight_bits})
    return {"top1": None if y is None else float((out.argmax(1) == y).mean()), "agree": accuracy.top1_agreement(out, ref),
            "kl": accuracy.mean_kl(out, ref), "quantize_s": round(t_q, 1),
            "weight_bits": bits, "float_ops": len(q.strategy.float_ops())}


def row_key(setting: str, corr: str) -> str:
    """A row's key in its model's cache; BRECQ rows since session 23 learn with the block's inner activations
    float (the reference's weight stage), so the ones measured before are not reused."""
    return f"{setting}|{corr}" + ("|inner-float" if "brecq" in corr else "")


def table(model: str, fp32: float | None, rows: dict, settings, corrections, n_eval: int, cmd: str = "",
          run_facts: str = "") -> str:
    """One model's table; its first line says what it was measured on (``run_facts``: its calibration and
    threads, which differ between models and runs, so they are stated here, not in the shared header)."""
    what = (f"FP32 top-1 {100 * fp32:.2f}%, {n_eval} test images" if fp32 is not None
            else f"{n_eval} unlabelled photo views: no top-1, agreement and KL against FP32")
    what += f", {run_facts}" if run_facts else ""
    lines = [f"**{model}** ({what}; `{cmd}`): top-1 % / top-1 agreement "
             "with FP32 % / mean KL(FP32 || quantized) / quantize seconds"
             + "".join(f"; {n} ops in float (no integer form in hago, e.g. the global average pool's mean)"
                       for n in sorted({r["float_ops"] for r in rows.values()}) if n), "",
             "| correction | " + " | ".join(LABELS.get(s, s) for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for c in corrections:
        cells = []
        for s in settings:
            r = rows.get(row_key(s, c))
            top1 = "—" if r is None or r["top1"] is None else f"{100 * r['top1']:.2f}"
            cells.append("—" if r is None else f"{top1} / {100 * r['agree']:.1f} / "
                         f"{r['kl']:.1e} / {r['quantize_s']:.0f} s")
        lines.append(f"| {'round to nearest' if c == 'none' else c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _merge(old_section: str, header: str, tables: dict[str, str]) -> str:
    """The section text: its header, then each model's table, the ones run now replacing their old ones (a
    model's table starts with ``**model**``), the others kept as they were. A section that exists keeps its
    header (notes added there by hand survive a partial re-run); ``header`` starts a new one."""
    parts = old_section.split("\n\n**")
    blocks = {}
    for part in parts[1:]:
        name = part.split("**", 1)[0]
        blocks[name] = "**" + part.strip()
    blocks.update(tables)
    return (parts[0].strip() or header) + "\n\n" + "\n\n".join(blocks.values())


def write_results(header: str, tables: dict[str, str]) -> None:
    """Replace (or append) the section under HEADING in RESULTS.md, up to the next ``## `` heading; models not
    run now keep their tables."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    if HEADING in old:
        head, rest = old.split(HEADING, 1)
        ends = [i for i in (rest.find("\n## "), rest.find("\n<!-- BEGIN")) if i >= 0]  # where the next section starts
        nxt = min(ends) if ends else -1
        section = f"{HEADING}\n\n{_merge(rest if nxt < 0 else rest[:nxt], header, tables)}\n"
        new = head + section + ("" if nxt < 0 else "\n" + rest[nxt + 1:])
    else:
        section = f"{HEADING}\n\n{_merge('', header, tables)}\n"
        new = old.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(new)


def _save_row(path: Path, key: str, name: str, row: dict) -> None:
    """Add one row to ``rows.json`` as it is on disk now: two runs side by side keep each other's rows."""
    disk = json.loads(path.read_text()) if path.exists() else {}
    disk.setdefault(key, {})[name] = row
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(disk, indent=1))
    tmp.replace(path)


def main() -> int:
    import torch

    from hago.pipeline import prepare_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mnist,fashion")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    p.add_argument("--corrections", default=",".join(CORRECTIONS))
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=10000, help="test images (a seeded subsample below 10000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gptq-samples", type=int, default=None,
                   help="calibration samples per layer for gptq / gptq_sequential (default: the plug-in's, 32)")
    p.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    p.add_argument("--cached-only", action="store_true", help="compute no row: tabulate what rows.json holds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    settings, corrections = args.settings.split(","), args.corrections.split(",")
    if args.gptq_samples is not None:
        from hago.correct import gptq

        gptq.DEFAULT_SAMPLES = args.gptq_samples
    WORK.mkdir(parents=True, exist_ok=True)
    cache_path = WORK / "rows.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    out = {}
    cmd = "python benchmarks/accuracy_table.py " + " ".join(a for a in sys.argv[1:] if a != "--cached-only")
    for model in args.models.split(","):
        net, calib, x, y, tag = load(model, args.n_calib, args.n_eval)
        ref = fp32_logits(net, x)
        fp32 = None if y is None else float((ref.argmax(1) == y).mean())
        prepared = prepare_model(net, calib, example_inputs=(torch.from_numpy(calib[:2]),))
        # v3: gptq's steps are fitted to its own codes (session 17); rows of earlier code are not reused
        key = f"v3|{model}|{tag}|{DEVICE}|calib{args.n_calib}|eval{len(x)}|threads{args.threads}"
        if args.gptq_samples is not None:
            key += f"|gptq{args.gptq_samples}"
        rows = cache.setdefault(key, {})
        print(f"{model}: FP32 top-1 {fp32} on {len(x)} test images", flush=True)
        for s in settings:
            for c in corrections:
                k = row_key(s, c)
                if k not in rows and args.cached_only:
                    continue
                if k not in rows:
                    try:
                        rows[k] = row(prepared, s, c, x, y, ref)
                    except Exception as exc:  # one failing plug-in must not lose the others' rows
                        print(f"  {s} {c}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                        continue
                    _save_row(cache_path, key, k, rows[k])
                print(f"  {s} {c}: {json.dumps(rows[k])}", flush=True)
        facts = (f"calibration {args.n_calib} {'photo crops' if tag == 'photos' else 'training images'}, "
                 f"{args.threads} thread(s)")
        out[model] = table(model, fp32, rows, settings, corrections, len(x), cmd, facts)
    header = (f"{DEVICE}; each table names its calibration and command; first and last weighted layers at 8-bit "
              "weights (and 8-bit inputs at W4A4); W8A8 and W4A8 run the realized integer program, W4A4 the "
              "fake-quant twin")
    print("\n" + header + "\n\n" + "\n\n".join(out.values()))
    if args.write:
        write_results(header, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
