"""The search space with bf16 as a choice: knobs, precision order, and a search that weighs bf16 against fp32."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hago.hwspec import HardwareSpec
from hago.pipeline import prepare_model
from hago.search.algorithms import ALGORITHMS
from hago.search.space import BF16, Knob, SearchSpace


@pytest.fixture(scope="module")
def mnist_graph(mnist_model):
    return prepare_model(mnist_model, example_inputs=(torch.zeros(2, 1, 28, 28),)).graph


def test_bf16_is_a_weight_choice_only_where_the_spec_declares_it(mnist_graph):
    bf16 = SearchSpace.from_graph(mnist_graph, HardwareSpec.load("x86-avx512-bf16"))
    vnni = SearchSpace.from_graph(mnist_graph, HardwareSpec.load("x86-avx512-vnni"))
    assert [k.choices for k in bf16.knobs] == [(0, 4, 8, BF16)] * 4  # two convs, two denses
    assert [k.choices for k in vnni.knobs] == [(0, 4, 8)] * 4
    assert bf16.widest() == (8,) * 4 and bf16.narrowest() == (4,) * 4  # "widest" stays all-integer
    assert bf16.all_bf16() == (BF16,) * 4 and vnni.all_bf16() is None
    cfg = bf16.config((BF16, 0, 8, 4))
    assert cfg.bf16_ops == {"n0_conv2d"} and cfg.float_ops == {"n3_conv2d"}
    assert cfg.node_weight_bits == {"n7_dense": 8, "n9_dense": 4}


def test_precision_rises_int4_int8_bf16_fp32():
    space = SearchSpace((Knob("a", "weight", (0, 4, 8, BF16)), Knob("b", "weight", (0, 8))))
    assert space.neighbours((8, 8), +1) == [(BF16, 8), (8, 0)]  # one step: int8 -> bf16, not straight to fp32
    assert space.neighbours((BF16, 8), -1) == [(8, 8)]
    assert space.raises((8, 8)) == [(BF16, 8), (0, 8), (8, 0)]  # every more precise choice, for the search
    assert space.raises((0, 0)) == []


@dataclass
class _Cand:
    point: tuple
    accuracy: float | None = None
    latency_ms: float | None = None
    error: str | None = None


class _Engine:
    """Accuracy and latency as formulas, so the algorithm's choice can be checked exactly.

    Layer 0 loses 2 points in int8 and nothing in bf16 or fp32; a layer costs
    1 ms in int8, ``bf16_ms`` in bf16, 2 ms in fp32.
    """

    tie_tolerance = 0.0

    def __init__(self, bf16_ms: float):
        self.space = SearchSpace((Knob("a", "weight", (0, 8, BF16)), Knob("b", "weight", (0, 8, BF16))))
        self.threshold, self.bf16_ms, self.measured = 0.99, bf16_ms, {}

    def _ms(self, p):
        return sum(1.0 if b == 8 else self.bf16_ms if b == BF16 else 2.0 for b in p)

    def accuracy(self, p):
        return _Cand(tuple(p), 1.0 - (0.02 if p[0] == 8 else 0.0))

    def latency(self, p):
        c = self.accuracy(p)
        c.latency_ms = self.measured[tuple(p)] = self._ms(p)
        return c

    def latencies(self, points):
        return [self.latency(p) for p in points]

    def estimate(self, p):
        return self._ms(p) if self.measured else None

    def all_candidates(self):
        return [_Cand(p, self.accuracy(p).accuracy, ms) for p, ms in self.measured.items()]


@pytest.mark.parametrize("bf16_ms,expected", [(1.5, BF16), (2.5, 0)])
def test_latency_search_restores_a_layer_at_its_cheapest_sufficient_precision(bf16_ms, expected):
    """bf16 where it is cheaper than fp32 (a CPU with fast bf16), fp32 where it is not (vdpbf16ps here)."""
    engine = _Engine(bf16_ms)
    ALGORITHMS["latency"](engine)
    good = [(ms, p) for p, ms in engine.measured.items() if engine.accuracy(p).accuracy >= engine.threshold]
    assert min(good)[1] == (expected, 8)
    assert (BF16, BF16) in engine.measured and (0, 0) in engine.measured  # both baselines priced every kernel
