"""The accuracy target and the metric it is measured with.

``--accuracy-drop 1%`` is relative to FP32 (keep 99% of its score);
``--accuracy-drop 0.5pt`` is absolute (lose at most 0.005 of a score in
[0, 1]). The metric is the user's: top-1 against labels when the evaluation
set has them, a callable ``metric(outputs, labels_or_fp32_outputs)`` when one
is given, and top-1 agreement with FP32 otherwise.

``metric="kl"`` (``hago search --max-kl X``) scores a candidate by minus its
mean KL divergence from FP32's softmax outputs, so FP32 scores 0 and an
absolute drop of X is "mean KL at most X". It is the target to give where
agreement is decided by near-ties: on EfficientNet-Lite0's 192 photo views
FP32 fed its own 8-bit input grid agrees on only 97.4% (KL 0.0023), so a 98%
agreement target asks for more than FP32's own input noise allows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import HagoError
from ..evaluate import agreement, mean_kl, top1


class SearchError(HagoError, ValueError):
    """A search cannot start: bad target, bad budget, bad log."""


@dataclass(frozen=True)
class AccuracyTarget:
    """``drop`` as a fraction (0.01 for ``1%`` or ``1pt``), from 0 up to, not including, 1."""

    drop: float
    relative: bool

    def __post_init__(self) -> None:
        d = self.drop
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            unit = "%" if self.relative else "pt"
            shown = f"{d * 100:g}{unit}" if isinstance(d, (int, float)) and not isinstance(d, bool) else repr(d)
            raise SearchError(f"accuracy drop {shown} is out of range: give a drop from 0{unit} up to "
                              f"(not including) 100{unit}, e.g. '1%' (relative) or '0.5pt' (absolute)")

    @classmethod
    def parse(cls, text: str) -> "AccuracyTarget":
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|pt)\s*", str(text))
        if not m:
            raise SearchError(f"accuracy drop {text!r} is not like '1%' (relative) or '0.5pt' (absolute)")
        return cls(float(m.group(1)) / 100.0, m.group(2) == "%")

    def threshold(self, fp32_score: float) -> float:
        return fp32_score * (1 - self.drop) if self.relative else fp32_score - self.drop

    def __str__(self) -> str:
        return f"{self.drop * 100:g}%" if self.relative else f"{self.drop * 100:g}pt"


Metric = Callable[[np.ndarray, np.ndarray], float]
#: the name the search's log and report give the ``kl`` metric (a score: higher is better, FP32 is 0)
KL_METRIC = "minus mean KL(FP32 || candidate)"


def kl_target(max_kl: float) -> AccuracyTarget:
    """The target "mean KL from FP32 at most ``max_kl``" for the ``kl`` metric (an absolute drop from 0)."""
    if isinstance(max_kl, bool) or not isinstance(max_kl, (int, float)) or not 0 < max_kl < 1:
        raise SearchError(f"--max-kl {max_kl!r}: give a mean KL divergence in nats, above 0 and below 1 "
                          "(e.g. 0.0023)")
    return AccuracyTarget(float(max_kl), relative=False)


def make_metric(labels: np.ndarray | None, fp32_outputs: np.ndarray, metric: Metric | None = None):
    """``score(outputs) -> float`` for candidate outputs, and its name for the report."""
    if metric == "kl":
        return (lambda out: -mean_kl(out, fp32_outputs)), KL_METRIC
    if metric is not None:
        ref = labels if labels is not None else fp32_outputs
        return (lambda out: float(metric(out, ref))), getattr(metric, "__name__", "metric")
    if labels is not None:
        return (lambda out: top1(out, labels)), "top-1"
    return (lambda out: agreement(out, fp32_outputs)), "top-1 agreement with FP32"
