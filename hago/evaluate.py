"""evaluate: accuracy of a build on the host, with the program that ships.

The quantized accuracy is measured by running the realized integer program
itself, not a float simulation of it, so the number in the report is the
number the device will reproduce (the same integer arithmetic).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .data import Samples


def predict(executable, samples: Samples, input_names: list[str], batch_size: int = 250,
            static: bool = False) -> np.ndarray:
    """Outputs of ``main`` over all samples, concatenated along the batch axis.

    A ``static`` build was compiled for exactly ``batch_size``: the last,
    partial batch is padded with zeros and the padding's outputs dropped.
    """
    vm = relax.VirtualMachine(executable, tvm.cpu())
    outs = []
    for batch in samples.batches(batch_size):
        n = len(next(iter(batch.values())))
        arrays = [np.ascontiguousarray(batch[name]) for name in input_names]
        if static and n < batch_size:
            arrays = [np.concatenate([a, np.zeros((batch_size - n, *a.shape[1:]), a.dtype)]) for a in arrays]
        out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
        if not hasattr(out, "numpy"):
            out = out[0]
        outs.append(out.numpy()[:n])
    return np.concatenate(outs)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max matches the label."""
    return float((logits.argmax(axis=-1) == labels.reshape(-1)).mean())


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Top-1 agreement with a reference (FP32) run: the metric when there are no labels."""
    return float((logits.argmax(axis=-1) == reference.argmax(axis=-1)).mean())


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def mean_kl(logits: np.ndarray, reference: np.ndarray) -> float:
    """Mean over samples of KL(softmax(reference) || softmax(logits)), in nats.

    A continuous measure of how far a quantized classifier's outputs moved:
    unlike top-1 agreement it is not decided by the few inputs whose top two
    classes nearly tie (on EfficientNet-Lite0's photo views, FP32 fed its own
    8-bit input grid already flips 5 of 192).
    """
    lp, lq = log_softmax(reference), log_softmax(logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())
