"""A small ResNet trained here on Fashion-MNIST: a labelled benchmark CNN for the 8/4-bit accuracy table.

The bundled MNIST CNN (``hago.zoo``) is near 99% and has no batch norm and no residual adds; this one
(stem conv, max pool, residual basic blocks with batch norm, global average pool, linear) exercises what
real CNNs quantize badly, and Fashion-MNIST's 10k labelled test images give top-1 as ground truth.

    python benchmarks/fashion.py          # train (or load) and print FP32 test top-1

Training takes a few minutes on one CPU thread. The state_dict is cached in
``benchmarks/work/fashion/resnet_<hash>.pt`` keyed by a hash of :data:`CONFIG` (and this file's model
code), so a re-run loads it (``torch.load(weights_only=True)``: tensors only, nothing unpickled).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = HERE / "work" / "fashion"

#: everything that decides the trained weights; its hash names the cached state_dict
CONFIG = {"widths": (24, 48, 96), "epochs": 3, "batch": 128, "lr": 0.01, "weight_decay": 5e-4, "seed": 0,
          "augment": "flip+shift2"}


def _modules():
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        """conv-bn-relu-conv-bn plus the input (a strided 1x1 conv-bn where the shape changes), then relu."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    class FashionResNet(nn.Module):
        """stem 3x3 conv-bn-relu at 28x28, 2x2 max pool, one basic block per width (the later ones stride 2),
        global average pool, linear."""

        def __init__(self, widths=(24, 48, 96), classes: int = 10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU(), nn.MaxPool2d(2))
            blocks, cin = [], widths[0]
            for i, w in enumerate(widths):
                blocks.append(BasicBlock(cin, w, 1 if i == 0 else 2))
                cin = w
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))

    return FashionResNet


def config_hash() -> str:
    text = json.dumps(CONFIG, sort_keys=True) + inspect.getsource(_modules)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def weights_path() -> Path:
    return WORK / f"resnet_{config_hash()}.pt"


def _augment(xb, rng: np.random.Generator):
    """Random horizontal flips and shifts of up to 2 pixels (zero = the normalised background padded)."""
    import torch

    flip = torch.from_numpy(rng.random(len(xb)) < 0.5)
    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
    dy, dx = (int(v) for v in rng.integers(-2, 3, 2))
    pad = torch.nn.functional.pad(xb, (2, 2, 2, 2), value=float(xb.min()))
    return pad[..., 2 + dy:30 + dy, 2 + dx:30 + dx]


def train(log=print):
    """Train :data:`CONFIG` on the 60k training images; SGD with Nesterov momentum, one-cycle LR."""
    import torch
    from torch import nn

    from fashion_data import fashion_mnist

    torch.manual_seed(CONFIG["seed"])
    rng = np.random.default_rng(CONFIG["seed"])
    x, y = fashion_mnist("train")
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    net = _modules()(CONFIG["widths"])
    steps = CONFIG["epochs"] * (len(x) // CONFIG["batch"])
    opt = torch.optim.SGD(net.parameters(), lr=CONFIG["lr"], momentum=0.9, nesterov=True,
                          weight_decay=CONFIG["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=CONFIG["lr"] * 10, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    net.train()
    for epoch in range(CONFIG["epochs"]):
        order = torch.from_numpy(rng.permutation(len(x)))
        for i in range(len(x) // CONFIG["batch"]):
            idx = order[i * CONFIG["batch"]:(i + 1) * CONFIG["batch"]]
            loss = loss_fn(net(_augment(x[idx], rng)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if i % 100 == 0:
                log(f"epoch {epoch} step {i} loss {loss.item():.3f} {time.perf_counter() - t0:.0f}s")
    return net.eval()


def fashion_cnn(log=print):
    """The trained eval-mode network: loaded from the cache, else trained and cached."""
    import torch

    path = weights_path()
    net = _modules()(CONFIG["widths"])
    if path.exists():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    net = train(log)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    return net


def top1(net, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    import torch

    with torch.no_grad():
        pred = np.concatenate([net(torch.from_numpy(x[i:i + batch])).argmax(1).numpy()
                               for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def main() -> int:
    import torch

    from fashion_data import fashion_mnist

    torch.set_num_threads(1)
    t = time.perf_counter()
    net = fashion_cnn()
    print(f"{weights_path().name}: {sum(p.numel() for p in net.parameters())} parameters, "
          f"ready in {time.perf_counter() - t:.0f}s")
    x, y = fashion_mnist("test")
    print(f"FP32 test top-1: {top1(net, x, y):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
