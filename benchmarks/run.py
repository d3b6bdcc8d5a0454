"""Side-by-side latency and accuracy: TVM FP32, hago INT8, ONNX Runtime FP32 and INT8.

All builds run in one process, on this machine, at batch 1 with 2 threads, so
the ratios are taken under the same conditions. Writes the table into
benchmarks/RESULTS.md (between the BEGIN/END markers of the model's section).

    python benchmarks/run.py [--model mnist] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"


def _median_ms(fn, min_s: float = 1.0, repeat: int = 7) -> float:
    fn()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.2:
        fn()
        n += 1
    per = (time.perf_counter() - t0) / n
    number = max(1, int(min_s / repeat / per))
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t) / number * 1e3)
    return float(np.median(runs))


def _ort_session(path, threads=2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_int8(fp32_path, calib, out_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    pre = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return out_path


def bench_mnist(n_eval: int) -> dict:
    import tvm
    from tvm import relax

    from hago import zoo
    from hago.compile import compile as hago_compile

    assets = zoo.export_mnist_demo(WORK / "mnist", n_calib=500)
    x_test, y_test = zoo.mnist_data("test")
    x_test, y_test = x_test[:n_eval], y_test[:n_eval]
    calib = np.load(assets["calib"])["input"]
    res = hago_compile(assets["model"], "x86-avx512-vnni", assets["calib"],
                       eval_data={"input": x_test, "label": y_test}, out_dir=WORK / "mnist_build")
    x1 = tvm.runtime.tensor(x_test[:1])
    rows = {}
    for name, ex in (("TVM FP32 (untuned)", res.fp32_executable), ("hago INT8 (untuned)", res.int_executable)):
        vm = relax.VirtualMachine(ex, tvm.cpu())
        rows[name] = {"ms": _median_ms(lambda: vm["main"](x1))}
    rows["TVM FP32 (untuned)"]["top1"] = res.report["fp32"]["accuracy"]
    rows["hago INT8 (untuned)"]["top1"] = res.report["quantized"]["accuracy"]

    ort_int8 = _ort_int8(assets["model"], calib, WORK / "mnist_ort_int8.onnx")
    for name, path in (("ONNX Runtime FP32", assets["model"]), ("ONNX Runtime INT8 (QDQ u8s8 per-channel)", ort_int8)):
        sess = _ort_session(path)
        feed1 = {"input": x_test[:1]}
        rows[name] = {"ms": _median_ms(lambda: sess.run(None, feed1))}
        logits = np.concatenate([sess.run(None, {"input": x_test[i:i + 500]})[0] for i in range(0, n_eval, 500)])
        rows[name]["top1"] = float((logits.argmax(1) == y_test).mean())
    return rows


def _machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import tvm

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, TVM {tvm.__version__}, ONNX Runtime {onnxruntime.__version__}"


def to_markdown(rows: dict, base: str) -> str:
    ref = rows[base]["ms"]
    lines = ["| build | median ms (batch 1) | speed-up vs TVM FP32 | top-1 |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ms']:.3f} | {ref / r['ms']:.2f}x | {r['top1']:.2%} |")
    return "\n".join(lines)


def write_results(section: str, body: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += f"\n{block}\n"
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mnist", choices=["mnist"])
    p.add_argument("--n-eval", type=int, default=10000)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = bench_mnist(args.n_eval)
    table = to_markdown(rows, "TVM FP32 (untuned)")
    print(table)
    if not args.no_write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
        body = (f"## MNIST CNN (ccexam, pretrained), x86-avx512-vnni\n\n"
                f"Command: `python benchmarks/run.py --model mnist` (commit {commit}, {time.strftime('%Y-%m-%d')}).\n"
                f"Machine: {_machine()}.\nAccuracy on the first {args.n_eval} images of the real MNIST test set.\n\n"
                f"{table}\n")
        write_results("mnist", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
