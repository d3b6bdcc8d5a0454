"""What ``hago/stack_alloc.py`` saves: one model built with TVM's default TIR pipeline and with hago's, timed interleaved.

    python benchmarks/ab_pipeline.py [--model efficientnet_lite0] [--rounds 8] [--threads 2]

Both builds come from the same realized integer program (quantized once, no corrections, 16 calibration
crops) and differ only in the TIR lowering: TVM's ``LowerTVMBuiltin`` turns a VNNI kernel's register tile
and its intrinsic temporaries into workspace allocator calls per parallel tile; hago's keeps them on the
stack. The two are timed in alternation in one process (this machine's speed drifts by up to 1.7x over
minutes, so only side-by-side ratios mean anything) and their outputs are compared bit for bit.
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
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # before TVM's thread pool starts

    import torch
    import tvm
    from tvm import relax

    import models
    from hago import stack_alloc
    from hago.build import target_of
    from hago.compiler import quantize, static_pair
    from hago.hwspec import HardwareSpec
    from hago.backends.x86.kernels import schedule_vnni
    from hago.lower import finish, fuse

    torch.set_num_threads(args.threads)
    spec = HardwareSpec.load("x86-avx512-vnni")
    target = target_of(spec)
    model = models.build(args.model)
    calib = models.photo_crops(16, seed=1)
    q = quantize(model, spec, {models.input_names(model)[0]: calib}, example_inputs=models.example_inputs(args.model),
                 corrections=[])
    _, integer = static_pair(q, spec, 1)
    kernels = fuse(schedule_vnni(integer, target), target)
    pipelines = ("default", stack_alloc.PIPELINE)
    vms = {name: relax.VirtualMachine(finish(kernels, target, tir_pipeline=name), tvm.cpu()) for name in pipelines}
    x = tvm.runtime.tensor(calib[:1])
    outs = [vms[name]["main"](x).numpy() for name in pipelines]
    times = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name, vm in vms.items():
            res = vm.time_evaluator("main", tvm.cpu(), number=20, repeat=3)(x)
            times[name].append(float(np.median(res.results)) * 1e3)
    ms = {name: float(np.median(t)) for name, t in times.items()}
    for name in pipelines:
        print(f"{name:8s} median {ms[name]:.3f} ms  ({' '.join(f'{t:.2f}' for t in times[name])})")
    print(f"{args.model}: hago's TIR pipeline {ms['default'] / ms[stack_alloc.PIPELINE]:.2f}x faster, "
          f"outputs bit-identical: {np.array_equal(outs[0], outs[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
