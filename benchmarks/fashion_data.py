"""Fashion-MNIST (Xiao et al. 2017) from its idx files: labelled ground truth for the accuracy table.

The files come from Debian's ``dataset-fashion-mnist`` (``make bench`` installs it, see
``tools/install_fashion_mnist.sh``): installed, they are in ``/usr/share/datasets/fashion-mnist/``;
unpacked without root, under ``benchmarks/work/apt-root/usr/share/datasets/fashion-mnist/``.
Read with numpy from the idx format (a big-endian header, then uint8 values): nothing is unpickled.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DIRS = (Path("/usr/share/datasets/fashion-mnist"), HERE / "work" / "apt-root" / "usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: mean and std of the 60k training pixels in [0, 1], the normalisation the benchmark CNN is trained with
MEAN, STD = 0.2860, 0.3530


def data_dir() -> Path:
    for d in DIRS:
        if (d / _FILES["test"][0]).is_file():
            return d
    raise FileNotFoundError("Fashion-MNIST idx files not found in " + " or ".join(map(str, DIRS))
                            + ": run `make bench` (or `bash tools/install_fashion_mnist.sh`)")


def read_idx(path: Path) -> np.ndarray:
    """One idx file (gzip or plain): magic ``0 0 dtype ndim``, ndim big-endian uint32 sizes, then the values."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", ndim, 4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} values for shape {shape}")
    return data.reshape(shape)


def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: float32 ``[N, 1, 28, 28]`` normalised images (train 60k, test 10k) and int64 labels."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}: train or test")
    d = data_dir()
    images, labels = (read_idx(d / f) for f in _FILES[split])
    x = ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
    return np.ascontiguousarray(x), labels.astype(np.int64)
