"""all-MiniLM-L6-v2 at 4-bit weights: BRECQ on transformer layers against round to nearest (issue 17).

    python benchmarks/minilm_w4.py [--rows w8a8:bias,w4a8:none,w4a8:bias,w4a8:brecq+bias] [--n-calib 64]
        [--threads 1] [--write]

Every dense layer of the six encoder layers at 4-bit weights (their inputs 8-bit: per-row dynamic where the
spec allows it, :mod:`hago.dynamic`), realized on ``x86-avx512-vnni``; the word-embedding table stays float.
``brecq`` learns the rounding of each attention sublayer (Q, K, V and output projections, with the attention
mask as a side input) and each MLP (two dense layers) jointly on the block's output
(:mod:`hago.correct.brecq`). Quality is what ``run.py --model minilm`` reports: gensim's Lee document
similarity (Pearson), WordSim353 and SimLex-999 (Spearman), and the mean cosine between each build's and
PyTorch FP32's embeddings of the Lee documents. ``quantize s`` is the wall time of ``hago.compile``
(calibration, corrections, realize, build). Rows are cached in ``benchmarks/work/minilm_w4/rows.json`` (keyed
by what decides them), so an interrupted run resumes; ``--write`` puts the table into ``benchmarks/RESULTS.md``
under its own heading.
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
WORK = HERE / "work" / "minilm_w4"
RESULTS = HERE / "RESULTS.md"
HEADING = "## all-MiniLM-L6-v2 at 4-bit weights: BRECQ on transformer layers (issue 17)"
DEVICE = "x86-avx512-vnni"
ROWS = ("w8a8:bias", "w4a8:none", "w4a8:bias", "w4a8:brecq+bias")
METRICS = (("lee_pearson", "Lee Pearson"), ("wordsim353_spearman", "WordSim353"),
           ("simlex999_spearman", "SimLex-999"), ("cos_vs_fp32", "cos vs FP32"))


def _embedder(fn, batch: int):
    import models
    from run import _run_batched

    return lambda texts: _run_batched(fn, models.tokenize(texts), batch)


def measure(row: str, model, example, calib, ref_docs: np.ndarray) -> dict:
    """Compile one row's build and score its embeddings."""
    import accuracy
    import models
    from run import _tvm_fn

    from hago.annotate import AnnotateConfig
    from hago.compiler import compile as hago_compile

    setting, corr = row.split(":")
    corrections = () if corr == "none" else tuple(corr.split("+"))
    cfg = AnnotateConfig(weight_bits=4) if setting == "w4a8" else None
    t = time.perf_counter()
    res = hago_compile(model, DEVICE, calib, example_inputs=example, measure=False, batch_size=8,
                       annotate_config=cfg, corrections=corrections)
    seconds = time.perf_counter() - t
    embed = _embedder(_tvm_fn(res.int_executable), 1)
    m = accuracy.sentence_metrics(embed)
    docs, _ = models.lee_corpus()
    m["cos_vs_fp32"] = accuracy.embedding_agreement(embed(docs), ref_docs)
    m["quantize_s"] = round(seconds, 1)
    return m


def table(rows: dict, fp32: dict, order, cmd: str) -> str:
    lines = [f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')}, {THREADS} thread(s)).", "",
             "| build | " + " | ".join(label for _, label in METRICS) + " | quantize s |",
             "|---|" + "---|" * (len(METRICS) + 1),
             "| PyTorch FP32 | " + " | ".join(f"{fp32[k]:.4f}" for k, _ in METRICS if k in fp32) + " | 1.0000 | — |"]
    for row in order:
        r = rows.get(row)
        if r is None:
            continue
        setting, corr = row.split(":")
        name = f"{setting.upper()}, {'round to nearest' if corr == 'none' else corr}"
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k, _ in METRICS) + f" | {r['quantize_s']:.0f} |")
    return "\n".join(lines)


def write_results(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else ""
    section = f"{HEADING}\n\n{text}\n"
    if HEADING in old:
        head, rest = old.split(HEADING, 1)
        nxt = rest.find("\n## ")
        old = head + section + ("" if nxt < 0 else rest[nxt:])
    else:
        old = old.rstrip() + "\n\n" + section
    RESULTS.write_text(old)


def _key(row: str, n_calib: int) -> str:
    """A row's cache key; BRECQ rows since session 23 learn with the block's inner activations float (the
    reference's weight stage), so the ones measured before are not reused."""
    return f"{row}|calib{n_calib}" + ("|inner-float" if "brecq" in row else "")


def main() -> int:
    import torch

    import accuracy
    import models
    from run import _torch_fn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    order = args.rows.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    cache = WORK / "rows.json"
    rows = json.loads(cache.read_text()) if cache.exists() else {}
    model = models.build("minilm")
    example = models.example_inputs("minilm")
    calib = models.tokenize(models.minilm_calibration_texts(args.n_calib))
    fp32_embed = _embedder(_torch_fn(model), 32)
    docs, _ = models.lee_corpus()
    ref_docs = fp32_embed(docs)
    fp32 = accuracy.sentence_metrics(fp32_embed)
    print(f"PyTorch FP32: {fp32}", flush=True)
    for row in order:
        key = _key(row, args.n_calib)
        if key not in rows:
            print(f"{row}: compiling", flush=True)
            rows[key] = measure(row, model, example, calib, ref_docs)
            cache.write_text(json.dumps(rows, indent=1))
        print(f"{row}: {rows[key]}", flush=True)
    text = table({r: rows[_key(r, args.n_calib)] for r in order}, fp32, order,
                 "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(text)
    if args.write:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
