"""Where one image's time goes: every kernel call of a hago build, summed per kernel name.

    python benchmarks/kernel_profile.py --model efficientnet_lite0 --build bf16 [--device x86-avx512-bf16]

``--build fp32`` profiles the FP32 build, ``int8`` the quantized one (no
corrections: speed only), ``bf16`` the all-bf16 build (``AnnotateConfig(all_bf16=True)``).
Each call is timed by the VM's instrument hook (:func:`hago.search.kernelcache.profile_calls`,
median of ``--runs``), so the sum is kernel time without the VM's own overhead.
Run on a quiet machine, with ``TVM_NUM_THREADS`` set as in ``run.py``.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

import models


def main() -> int:
    import torch
    import tvm
    from tvm import relax

    from hago.annotate import AnnotateConfig
    from hago.compiler import compile as hago_compile
    from hago.search.kernelcache import profile_calls

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--build", choices=("fp32", "int8", "bf16"), default="bf16")
    p.add_argument("--device", default=None, help="spec (default: x86-avx512-bf16 for bf16, else x86-avx512-vnni)")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    device = args.device or ("x86-avx512-bf16" if args.build == "bf16" else "x86-avx512-vnni")
    net = models.build(args.model)
    calib = models.photo_crops(8, seed=1)
    cfg = AnnotateConfig(all_bf16=True) if args.build == "bf16" else None
    res = hago_compile(net, device, calib, example_inputs=(torch.from_numpy(calib[:1]),), measure=False,
                       annotate_config=cfg, corrections=())
    ex = res.fp32_executable if args.build == "fp32" else res.int_executable
    vm = relax.VirtualMachine(ex, tvm.cpu())
    image = [tvm.runtime.tensor(calib[:1].astype("float32"))]
    for _ in range(5):  # warm: first calls page the weights in
        vm["main"](*image)
    calls = profile_calls(vm, image, runs=args.runs)
    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    for sig, ms in calls:
        name = re.sub(r"\d+$", "", sig.split("(")[0])  # one row for every numbered copy of a kernel
        per_kernel[name][0] += 1
        per_kernel[name][1] += ms
    print(f"{args.model} {args.build} on {device}: {sum(ms for _, ms in calls):.3f} ms of kernels, {len(calls)} calls")
    print("    ms  calls  kernel")
    for name, (count, ms) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{ms:6.3f} {count:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
