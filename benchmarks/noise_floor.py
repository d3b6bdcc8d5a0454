"""How much top-1 agreement FP32 keeps when only its input is rounded to an 8-bit grid (EfficientNet-Lite0).

The noise floor the accuracy targets are judged against: FP32 fed its own
input quantized to 256 levels over the views' range (what every INT8 build's
first quantize does) against FP32 on the float input, on the 192 photo views:
mean KL and top-1 agreement, and the smallest top-1/top-2 logit margins that
make agreement this fragile. bf16 rounding of every conv/linear input and
weight (round to nearest even, fp32 accumulation) is printed beside it.

    python benchmarks/noise_floor.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    import torch

    import models
    from hago.evaluate import agreement, mean_kl

    torch.set_num_threads(2)
    model = models.build("efficientnet_lite0").eval()
    views, _ = models.photo_views()
    x = torch.from_numpy(views)
    with torch.no_grad():
        ref = model(x).numpy()
    lo, hi = x.amin(), x.amax()
    step = (hi - lo) / 255
    with torch.no_grad():
        grid = model(torch.round((x - lo) / step) * step + lo).numpy()
    margins = np.sort(np.sort(ref, 1)[:, -1] - np.sort(ref, 1)[:, -2])
    print(f"FP32 on its 8-bit input grid: agreement {agreement(grid, ref):.2%}, mean KL {mean_kl(grid, ref):.4f} "
          f"({len(views)} views)")
    print(f"views with a top-1/top-2 logit margin under 0.07: {(margins < 0.07).sum()} "
          f"(smallest {', '.join(f'{m:.3f}' for m in margins[:5])})")

    def bf16(t):
        return t.to(torch.bfloat16).float()

    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            mod.weight.data = bf16(mod.weight.data)
            mod.register_forward_pre_hook(lambda m, inp: (bf16(inp[0]),))
    with torch.no_grad():
        out = model(x).numpy()
    print(f"bf16 inputs and weights everywhere (PyTorch, RNE, fp32 accumulation): agreement {agreement(out, ref):.2%}, "
          f"mean KL {mean_kl(out, ref):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
