"""``make demo``: the main job on the bundled default model.

Exports the pretrained MNIST CNN (ccexam) to ONNX with 500 calibration images
from MNIST's training split and the real 10k test set, then runs exactly what
a user would type: ``hago compile mnist_cnn.onnx --device x86-avx512-vnni``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import main as cli_main
from .zoo import export_mnist_demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hago.demo")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--device", default="x86-avx512-vnni")
    args = p.parse_args(argv)
    out = Path(args.out)
    assets = export_mnist_demo(out / "assets")
    cmd = ["compile", str(assets["model"]), "--device", args.device, "--calib", str(assets["calib"]),
           "--eval", str(assets["eval"]), "-o", str(out / "build")]
    print("$ hago " + " ".join(cmd), flush=True)
    return cli_main(cmd)


if __name__ == "__main__":
    sys.exit(main())
