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


def predict(executable, samples: Samples, input_names: list[str], batch_size: int = 256) -> np.ndarray:
    """Outputs of ``main`` over all samples, concatenated along the batch axis."""
    vm = relax.VirtualMachine(executable, tvm.cpu())
    outs = []
    for batch in samples.batches(batch_size):
        args = [tvm.runtime.tensor(np.ascontiguousarray(batch[n])) for n in input_names]
        out = vm["main"](*args)
        if not hasattr(out, "numpy"):
            out = out[0]
        outs.append(out.numpy())
    return np.concatenate(outs)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max matches the label."""
    return float((logits.argmax(axis=-1) == labels.reshape(-1)).mean())


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Top-1 agreement with a reference (FP32) run: the metric when there are no labels."""
    return float((logits.argmax(axis=-1) == reference.argmax(axis=-1)).mean())
