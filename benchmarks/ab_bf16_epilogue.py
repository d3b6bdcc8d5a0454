"""What the bf16 conv's write-back epilogue saves: one all-bf16 build with and without it, timed interleaved.

    python benchmarks/ab_bf16_epilogue.py [--model efficientnet_lite0] [--device x86-avx512-bf16] [--rounds 30]
                                          [--part all|residual|cast|pad]

The build puts a bf16 conv's bias, relu / relu6 and the bf16 cast for the next bf16 layer into the conv
kernel's write-back (``hago.backends.cpu.bf16_epilogue.fuse_bf16_epilogues``); without it they are passes of
their own. ``--part residual`` leaves out only the residual add, ``--part cast`` only the second output
(the bf16 cast of an fp32 value that another layer reads too, written by the same write-back instead of a
cast pass of its own). ``--part pad`` compares a conv padding its bf16 input inside its own kernel
(``hago.backends.x86.bf16.PAD_INSIDE``) with a padding pass before it. The two builds differ only in that (the "without" build skips the rewrite), are timed in
alternation (A B, B A, ...)
in one process (this machine's speed drifts by up to 1.8x over minutes: only side-by-side ratios mean
anything), and their outputs are compared bit for bit.
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
    p.add_argument("--device", default="x86-avx512-bf16")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--part", choices=("all", "residual", "cast", "pad"), default="all",
                   help="leave out the whole epilogue, only its residual add, only its second (bf16) output, or "
                        "pad each conv's input in a pass of its own")
    args = p.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # before TVM's thread pool starts

    import torch
    import tvm
    from tvm import relax

    import models
    from hago.annotate import AnnotateConfig
    from hago.compiler import compile as hago_compile
    from hago.backends.cpu import bf16_epilogue
    from hago.backends.x86 import bf16

    net, calib = models.build(args.model), models.photo_crops(8, seed=1)

    def build(fused: bool):
        own = bf16_epilogue.fuse_bf16_epilogues
        bf16.PAD_INSIDE = fused or args.part != "pad"
        if not fused and args.part == "all":
            bf16_epilogue.fuse_bf16_epilogues = lambda mod, *a, **k: mod
        elif not fused and args.part != "pad":
            off = "residual" if args.part == "residual" else "two_outputs"
            bf16_epilogue.fuse_bf16_epilogues = lambda mod, *a, **k: own(mod, *a, **{**k, off: False})
        try:
            res = hago_compile(net, args.device, calib, example_inputs=(torch.from_numpy(calib[:1]),), measure=False,
                               annotate_config=AnnotateConfig(all_bf16=True), corrections=())
        finally:
            bf16_epilogue.fuse_bf16_epilogues, bf16.PAD_INSIDE = own, True
        return relax.VirtualMachine(res.int_executable, tvm.cpu())

    what = {"all": "epilogue", "residual": "residual add", "cast": "bf16 cast of a shared fp32 value",
            "pad": "input padding"}[args.part]
    where = "in the conv" if args.part == "pad" else "in the write-back"
    vms = {f"{what} {where}": build(True), f"{what} as passes of their own": build(False)}
    image = tvm.runtime.tensor(calib[:1].astype("float32"))
    outs = [vm["main"](image).numpy() for vm in vms.values()]
    same = np.array_equal(*outs)
    times = {k: [] for k in vms}
    for r in range(args.rounds):  # A B, then B A: the first build of a round times slower here (up to 9%)
        for name, vm in (list(vms.items()) if r % 2 == 0 else list(vms.items())[::-1]):
            times[name].append(vm.time_evaluator("main", tvm.cpu(), number=10, repeat=1)(image).mean * 1e3)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{args.model}, all-bf16 on {args.device}, {args.threads} threads, {args.rounds} interleaved rounds; "
          f"outputs {'bit-identical' if same else 'DIFFER'}")
    for name, ms in med.items():
        print(f"  {name}: {ms:.3f} ms")
    fused, plain = med.values()
    ratio = np.asarray(list(times.values())[1]) / np.asarray(list(times.values())[0])
    print(f"  speed-up: {plain / fused:.3f}x (medians); per round {np.median(ratio):.3f}x "
          f"(quartiles {np.percentile(ratio, 25):.3f}-{np.percentile(ratio, 75):.3f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
