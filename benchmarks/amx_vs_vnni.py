"""Where hago's AMX int8 conv beats its VNNI conv: every conv shape of ResNet-18, MobileNetV2 and EfficientNet-Lite0.

    python benchmarks/amx_vs_vnni.py [--threads 2] [--rounds 5] [--only resnet18]

Each shape is built three ways in one module from the same uint8 NCHW16c input, int8 weights and requantize
constants (batch 1; the float requantize of the x86-amx spec): the VNNI conv requantizing on its register
tiles (what the x86 plan runs), the AMX
int8 conv with its default K step (``conv_int8.int8_geometry``), and the AMX conv reading the 16-channel
blocks in place (``kb = 16``, where the conv does not pad). Outputs are checked equal, then the kernels are
timed in alternation (``time_evaluator``, min over rounds), so the ratios are side by side. The printed table
gives the rule in ``hago/backends/amx/conv_int8.amx_int8_pays``, and each AMX time as a fraction of the tile
unit's peak: 1024 int8 MAC per cycle per core at the clock ``/proc/cpuinfo`` reports, on ``--threads`` cores.
MiniLM's two largest matmuls (seq 128: 128x384 @ 384x1536 and 128x1536 @ 1536x384, int8) are timed the same
way, AMX dense against VNNI dense (``--only minilm``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: (model, c, hw, o, k, stride): the distinct non-depthwise convs; a stem (c < 16) reads plain NCHW and runs on
#: AMX with its kernel columns folded into K (``emit_conv2d_amx_int8_taps``)
SHAPES = [
    ("resnet18", 3, 224, 64, 7, 2), ("mobilenetv2", 3, 224, 32, 3, 2),
    ("resnet18", 64, 56, 64, 3, 1), ("resnet18", 64, 56, 128, 3, 2), ("resnet18", 64, 56, 128, 1, 2),
    ("resnet18", 128, 28, 128, 3, 1), ("resnet18", 128, 28, 256, 3, 2), ("resnet18", 128, 28, 256, 1, 2),
    ("resnet18", 256, 14, 256, 3, 1), ("resnet18", 256, 14, 512, 3, 2), ("resnet18", 256, 14, 512, 1, 2),
    ("resnet18", 512, 7, 512, 3, 1),
    ("mobilenetv2", 32, 112, 16, 1, 1), ("mobilenetv2", 16, 112, 96, 1, 1), ("mobilenetv2", 96, 56, 24, 1, 1),
    ("mobilenetv2", 24, 56, 144, 1, 1), ("mobilenetv2", 144, 56, 24, 1, 1), ("mobilenetv2", 144, 28, 32, 1, 1),
    ("mobilenetv2", 32, 28, 192, 1, 1), ("mobilenetv2", 192, 28, 32, 1, 1), ("mobilenetv2", 192, 14, 64, 1, 1),
    ("mobilenetv2", 64, 14, 384, 1, 1), ("mobilenetv2", 384, 14, 64, 1, 1), ("mobilenetv2", 384, 14, 96, 1, 1),
    ("mobilenetv2", 96, 14, 576, 1, 1), ("mobilenetv2", 576, 14, 96, 1, 1), ("mobilenetv2", 576, 7, 160, 1, 1),
    ("mobilenetv2", 160, 7, 960, 1, 1), ("mobilenetv2", 960, 7, 160, 1, 1), ("mobilenetv2", 960, 7, 320, 1, 1),
    ("mobilenetv2", 320, 7, 1280, 1, 1),
    ("efficientnet_lite0", 240, 28, 40, 1, 1), ("efficientnet_lite0", 40, 28, 240, 1, 1),
    ("efficientnet_lite0", 480, 14, 112, 1, 1), ("efficientnet_lite0", 672, 7, 192, 1, 1),
    ("efficientnet_lite0", 1152, 7, 192, 1, 1), ("efficientnet_lite0", 1152, 7, 320, 1, 1),
]
#: (model, m, k, n): int8 matmuls timed AMX against VNNI
DENSE = [("minilm", 128, 384, 1536), ("minilm", 128, 1536, 384)]
AMX_MACS_PER_CYCLE = 1024  # int8, per core (Intel AMX: 16x64 by 64x16 in 16 cycles)


def clock_ghz() -> float:
    """The clock /proc/cpuinfo reports (a VM's nominal one; turbo can run faster, so fractions are upper bounds)."""
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
        return max(mhz) / 1e3
    except (OSError, ValueError):
        return float("nan")


def peak_fraction(macs: float, us: float, cores: int) -> float:
    return macs / (us * 1e-6) / (cores * clock_ghz() * 1e9 * AMX_MACS_PER_CYCLE)


def _requant(o, rng):
    """Float requantize constants, as the x86-amx spec declares (``requantize: float``) for both kernels."""
    from hago.backends.base import Requant

    scale = (rng.integers(2**29, 2**30, o) / 2.0**44).astype(np.float32)
    return Requant(rng.integers(-5000, 5000, o).astype(np.int32), None, None, 100, 0, 255, "uint8", scale=scale)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", default=None)
    args = p.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    import tvm
    from tvm import relax

    from hago.backends.amx.conv_int8 import emit_conv2d_amx_int8, emit_conv2d_amx_int8_taps, int8_geometry
    from hago.backends.amx.dense import emit_dense_amx
    from hago.backends.amx.permission import amx_available
    from hago.backends.registry import get_backend
    from hago.backends.x86.kernels import emit_conv2d_vnni, emit_dense_vnni

    missing = amx_available()
    if missing:
        print(f"skipped: {missing}")
        return 0
    rng = np.random.default_rng(0)
    shapes = [s for s in SHAPES if args.only in (None, s[0])]
    bb = relax.BlockBuilder()
    inputs, variants = {}, {}
    for i, (model, c, hw, o, k, s) in enumerate(shapes):
        pad = (k // 2,) * 4
        stem = c < 16
        x = rng.integers(0, 256, (1, c, hw, hw) if stem else (1, -(-c // 16), hw, hw, 16), dtype=np.uint8)
        w = rng.integers(-128, 128, (o, c, k, k), dtype=np.int8)
        rq = _requant(o, rng)
        g = "taps" if stem else int8_geometry(x.shape, w.shape, (s, s), pad)
        ways = {"vnni": None, "amx": g}
        if not stem and not any(pad) and g.k_block != 16:
            ways["amx_kb16"] = dataclasses.replace(g, kb=16)
        for way, geo in ways.items():
            name = f"s{i}_{way}"
            v = relax.Var("x", relax.TensorType(x.shape, "uint8"))
            with bb.function(name, [v]):
                with bb.dataflow():
                    if geo is None:
                        y = emit_conv2d_vnni(bb, v, w, (s, s), (1, 1), 1, pad, 100, rq, out_layout="NCHW16c")
                    elif geo == "taps":
                        y = emit_conv2d_amx_int8_taps(bb, v, w, (s, s), pad, 100, rq, threads=args.threads)
                    else:
                        y = emit_conv2d_amx_int8(bb, v, w, (s, s), pad, 100, rq, threads=args.threads, g=geo)
                    out = bb.emit_output(y)
                bb.emit_func_output(out)
            variants.setdefault(i, []).append((way, name, geo))
        inputs[i] = tvm.runtime.tensor(x)
    denses = [d for d in DENSE if args.only in (None, d[0])]
    for j, (model, m, k, n) in enumerate(denses):
        w = rng.integers(-128, 128, (k, n), dtype=np.int8)
        for way in ("vnni", "amx"):
            v = relax.Var("x", relax.TensorType((m, k), "uint8"))
            with bb.function(f"d{j}_{way}", [v]):
                with bb.dataflow():
                    y = emit_dense_vnni(bb, v, w) if way == "vnni" else emit_dense_amx(bb, v, w, "int8",
                                                                                       threads=args.threads)
                    out = bb.emit_output(y)
                bb.emit_func_output(out)
        inputs[f"d{j}"] = tvm.runtime.tensor(rng.integers(0, 256, (m, k), dtype=np.uint8))
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": args.threads})
    with target:
        ex = get_backend("x86").build(bb.get(), target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    print(f"clock {clock_ghz():.2f} GHz (/proc/cpuinfo), {args.threads} threads; AMX peak "
          f"{args.threads * clock_ghz() * AMX_MACS_PER_CYCLE:.0f} GMAC/s")
    print(f"{'model':<19}{'conv':<22}{'MMAC':>7}{'vnni us':>9}{'amx us':>9}{'kb':>4}{'amx16 us':>9}"
          f"{'vnni/amx':>9}{'peak':>7}")
    for i, (model, c, hw, o, k, s) in enumerate(shapes):
        outs = {way: vm[name](inputs[i]).numpy() for way, name, _ in variants[i]}
        for way, out in outs.items():
            assert np.array_equal(out, outs["vnni"]), f"{model} {c}->{o}: {way} differs from vnni"
        best = {way: float("inf") for way, _, _ in variants[i]}
        for _ in range(args.rounds):
            for way, name, _ in variants[i]:
                t = vm.time_evaluator(name, tvm.cpu(), number=20, repeat=1)(inputs[i]).min * 1e6
                best[way] = min(best[way], t)
        g = dict((way, geo) for way, _, geo in variants[i])["amx"]
        oh = (hw + 2 * (k // 2) - k) // s + 1
        macs = o * oh * oh * c * k * k / 1e6
        kb16 = f"{best['amx_kb16']:9.1f}" if "amx_kb16" in best else f"{'-':>9}"
        amx = min(v for way, v in best.items() if way != "vnni")
        print(f"{model:<19}{f'{k}x{k}/{s} {c}->{o} @{hw}':<22}{macs:7.1f}{best['vnni']:9.1f}{best['amx']:9.1f}"
              f"{'taps' if g == 'taps' else g.k_block:>4}{kb16}{best['vnni'] / amx:9.2f}{peak_fraction(macs * 1e6, amx, args.threads):7.1%}")
    for j, (model, m, k, n) in enumerate(denses):
        outs = {way: vm[f"d{j}_{way}"](inputs[f"d{j}"]).numpy() for way in ("vnni", "amx")}
        assert np.array_equal(outs["vnni"], outs["amx"]), f"{model} {m}x{k}x{n}: amx differs from vnni"
        best = {way: min(vm.time_evaluator(f"d{j}_{way}", tvm.cpu(), number=20, repeat=1)(inputs[f"d{j}"]).min
                         for _ in range(args.rounds)) * 1e6 for way in ("vnni", "amx")}
        macs = m * k * n
        print(f"{model:<19}{f'matmul {m}x{k}x{n}':<22}{macs / 1e6:7.1f}{best['vnni']:9.1f}{best['amx']:9.1f}"
              f"{'':4}{'-':>9}{best['vnni'] / best['amx']:9.2f}{peak_fraction(macs, best['amx'], args.threads):7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
