"""hago's FP32 build of any ONNX file against ONNX Runtime FP32, timed in interleaved rounds.

    python benchmarks/onnx_fp32.py model.onnx [more.onnx ...] [--device x86-avx512-vnni] [--rounds 40]

The FP32 build a user gets is the baseline every speed-up hago reports is
taken against, and the search falls back to: it has to be as fast as the
FP32 runtime the user would otherwise deploy. This times it on model files
as users bring them, not only on the benchmark's own exports.

Per file, at batch 1 on ``run.py``'s threads: hago's FP32 build (what
``hago compile`` builds and reports as FP32: ``prepare_model``, then the
spec's backend, untuned) and an ONNX Runtime session. Inputs are random, of
the file's shapes (a symbolic dim taken as 1), so the figures are latency
only; the two outputs are checked to agree first. Each round times
``--calls`` calls of each, after one untimed call (which absorbs the other
runtime's spinning threads), and keeps the median per call; which one goes
first alternates. The table gives the medians and the per-round ratio.

The files in RESULTS are torchvision 0.28's architectures with random
weights, exported as ``torch.onnx.export(model.eval(), (torch.randn(1, 3,
224, 224),), path)`` with every default (the dynamo exporter, batch 1).
torchvision is not a dependency of hago.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _inputs(path: Path) -> dict[str, np.ndarray]:
    """Random arrays for the graph's real inputs (initializers excluded), symbolic dims as 1."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    out = {}
    for inp in model.graph.input:
        if inp.name in weights:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        out[inp.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                         else np.zeros(shape, dtype))
    return out


def _hago_fp32(path: Path, feeds: dict[str, np.ndarray], device: str):
    import tvm
    from tvm import relax

    from hago import build as build_mod
    from hago.hwspec import HardwareSpec
    from hago.pipeline import prepare_model

    start = time.perf_counter()
    prepared = prepare_model(str(path), feeds)
    spec = HardwareSpec.load(device)
    vm = relax.VirtualMachine(build_mod.build_for(build_mod.static_batch(prepared.fp32, 1), spec), tvm.cpu())
    seconds = time.perf_counter() - start
    args = [tvm.runtime.tensor(v) for v in feeds.values()]
    main = vm["main"]

    def first_output():
        out = main(*args)
        return out.numpy() if hasattr(out, "numpy") else out[0].numpy()

    return (lambda: main(*args)), first_output, seconds


def bench(path: Path, device: str, rounds: int, calls: int) -> str:
    import run
    from bf16_interleaved import _block_ms as per_call_ms  # median per call, after one untimed call

    feeds = _inputs(path)
    hago_call, hago_out, build_s = _hago_fp32(path, feeds, device)
    sess = run._ort_session(path)
    ort_call = lambda: sess.run(None, feeds)  # noqa: E731
    ref = sess.run(None, feeds)[0]
    err = float(np.abs(hago_out() - ref).max() / max(float(np.abs(ref).max()), 1e-30))
    if err > 1e-3:
        raise SystemExit(f"{path}: hago's FP32 output differs from ONNX Runtime's by {err:.2e} of its largest value")
    h, o = [], []
    for r in range(rounds):
        pair = [(hago_call, h), (ort_call, o)]
        for fn, out in (pair if r % 2 == 0 else pair[::-1]):
            out.append(per_call_ms(fn, calls))
    ratio = np.asarray(h) / np.asarray(o)
    q1, q3 = np.percentile(ratio, [25, 75])
    name = path.parent.name if path.stem == "model" else path.stem
    return (f"| {name} | {np.median(h):.2f} | {np.median(o):.2f} | {np.median(ratio):.2f}x ({q1:.2f}-{q3:.2f}) "
            f"| {build_s:.0f} s |")


def main() -> int:
    import run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="ONNX files")
    p.add_argument("--device", default="x86-avx512-vnni", help="the spec hago builds for (default %(default)s)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--calls", type=int, default=20, help="timed calls per build per round")
    args = p.parse_args()
    print(f"FP32 at batch 1, {run.THREADS} threads, {args.rounds} interleaved rounds of {args.calls} calls each, "
          f"hago on {args.device}\n")
    print("| model | hago FP32 ms | ONNX Runtime FP32 ms | hago / ORT per round (IQR) | hago build |")
    print("|---|---:|---:|---:|---:|")
    for path in args.models:
        print(bench(path, args.device, args.rounds, args.calls), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
