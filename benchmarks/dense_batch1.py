"""A float dense layer at batch 1 (a classifier head) in hago's FP32 build against ONNX Runtime's, interleaved.

    python benchmarks/dense_batch1.py [--shapes 1280x1000,1280x1001,512x1000] [--rounds 10]

Each shape ``KxN`` is ``x[1, K] @ W[K, N] + b`` with random constants: hago's build (the default float schedule,
``hago.lower``, on the weight as ``[N/64, K, 64]`` column panels, ``backends/cpu/float_dense``) and ONNX Runtime's
MatMul + Add on the same numbers, both on ``run.py``'s threads, timed in turn for ``--rounds`` rounds (each
round opened by the other build than the last), median per build. The outputs are checked against numpy first.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _hago(w, b):
    import tvm
    from tvm import relax
    from tvm.relax import op as O

    from hago.build import build, host_target

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, w.shape[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(O.add(O.matmul(x, relax.const(w)), relax.const(b)))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(build(bb.get(), host_target()), tvm.cpu())
    return lambda xv: vm["main"](tvm.runtime.tensor(xv)).numpy()


def _ort(w, b, threads):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Add", ["y", "b"], ["out"])], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(onnx.shape_inference.infer_shapes(model).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return lambda xv: sess.run(None, {"x": xv})[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1280x1000,1280x1001,512x1000")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    import run

    os.environ.setdefault("TVM_NUM_THREADS", str(run.THREADS))
    rng = np.random.default_rng(0)
    print("| K x N | hago FP32 us | ONNX Runtime FP32 us | ORT's time / hago's |")
    print("|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w = rng.standard_normal((k, n)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        x = rng.standard_normal((1, k)).astype(np.float32)
        fns = {"hago": _hago(w, b), "ort": _ort(w, b, run.THREADS)}
        for name, fn in fns.items():
            np.testing.assert_allclose(fn(x), x @ w + b, rtol=1e-4, atol=1e-3, err_msg=name)
        times = {name: [] for name in fns}
        for r in range(args.rounds):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[name].append(run._median_ms(lambda fn=fns[name]: fn(x)) * 1e3)
        h, o = (float(np.median(times[name])) for name in ("hago", "ort"))
        print(f"| {k} x {n} | {h:.1f} | {o:.1f} | {o / h:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
