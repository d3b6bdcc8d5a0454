"""Multipoint as a search choice (``4+``): fitted once per layer, priced by realized bytes and measured latency."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from hago.correct.multipoint import Multipoint
from hago.multipoint import to_rows
from hago.search.algorithms import ALGORITHMS
from hago.search.space import MULTIPOINT, SearchSpace, is_multipoint
from hago.search.target import kl_target

from .test_engine import _engine, data  # noqa: F401  (data: the fixture)

pytestmark = [pytest.mark.llvm]
MP4 = MULTIPOINT + 4


@pytest.fixture(scope="module")
def engine(mnist_onnx_path, data, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("mp_choice")
    # no corrections: the points are compared with plain rounding alone (corrected: the test below)
    return _engine(mnist_onnx_path, data, d / "s.jsonl", metric="kl", accuracy_drop=kl_target(0.05),
                   multipoint=True, max_trials=8, cache_dir=d / "cache", corrections=())


def _with(point, i, c):
    p = list(point)
    p[i] = c
    return tuple(p)


def test_every_dense_and_conv_gets_a_4plus_choice_between_4_and_8_bits(engine):
    weight = [k for k in engine.space.knobs if k.kind == "weight"]
    assert weight and all(MP4 in k.choices for k in weight)  # the MNIST CNN: one-group convs and denses
    assert all(SearchSpace._order(k)[:3] == [4, MP4, 8] for k in weight)
    plain = SearchSpace.from_graph(engine.graph, engine.spec)  # without the flag the space is unchanged
    assert not any(is_multipoint(c) for k in plain.knobs for c in k.choices)
    assert engine.space.widest() == plain.widest() and engine.space.narrowest() == plain.narrowest()
    assert "4+" in engine.label(tuple(MP4 if k.kind == "weight" else b
                                      for k, b in zip(engine.space.knobs, engine.space.widest())))


def test_a_4plus_layer_carries_points_and_costs_bytes_between_4_and_8_bits(engine):
    narrow = engine.space.narrowest()
    i = max(range(len(engine.space.knobs)), key=lambda j: engine.graph.node(engine.space.knobs[j].name).weight.size)
    name = engine.space.knobs[i].name
    s4, s4p = engine.strategy(narrow), engine.strategy(_with(narrow, i, MP4))
    assert s4.ops[name].multipoint is None and s4p.ops[name].multipoint is not None
    assert s4p.ops[name].weight_bits == 4
    b4, b4p, b8 = (engine.weight_bytes(_with(narrow, i, c)) for c in (4, MP4, 8))
    assert b4 < b4p < b8


def test_points_lower_the_kl_of_the_all_4bit_build(engine):
    narrow = engine.space.narrowest()
    all_mp = tuple(MP4 if k.kind == "weight" else b for k, b in zip(engine.space.knobs, narrow))
    kl4, kl4p = -engine.accuracy(narrow).accuracy, -engine.accuracy(all_mp).accuracy
    assert 0 < kl4p < kl4


def test_a_4plus_layer_gets_a_bias_delta_of_its_own_that_lowers_the_kl(engine, mnist_onnx_path, data,  # noqa: F811
                                                                         tmp_path):
    """The search's bias correction runs once more with the points applied: a ``4+`` layer rounds differently
    from its plain 4-bit self, so it gets its own delta, and the corrected all-``4+`` build beats the
    uncorrected one (the module's engine)."""
    e = _engine(mnist_onnx_path, data, tmp_path / "bias.jsonl", metric="kl", accuracy_drop=kl_target(0.05),
                multipoint=True, max_trials=8, cache_dir=engine.log.path.parent / "cache", corrections=("bias",))
    narrow = e.space.narrowest()
    all_mp = tuple(MP4 if k.kind == "weight" else b for k, b in zip(e.space.knobs, narrow))
    plain, pointed = e.strategy(narrow), e.strategy(all_mp)
    assert "multipoint" in e._corrected_at
    names = [n for n, op in pointed.ops.items() if op.multipoint is not None]
    assert names
    for name in names:
        assert plain.ops[name].bias_delta is not None and pointed.ops[name].bias_delta is not None
        assert not np.allclose(plain.ops[name].bias_delta, pointed.ops[name].bias_delta)
    assert -e.accuracy(all_mp).accuracy < -engine.accuracy(all_mp).accuracy


def test_points_are_fitted_once_and_cached_as_data(engine, mnist_onnx_path, data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(Multipoint, "run", lambda *a, **k: pytest.fail("refitted cached multipoint points"))
    again = _engine(mnist_onnx_path, data, tmp_path / "again.jsonl", metric="kl", accuracy_drop=kl_target(0.05),
                    multipoint=True, max_trials=8, cache_dir=engine.log.path.parent / "cache")
    assert again.points.layers == engine.points.layers and engine.points.layers


def test_a_size_budget_search_with_4plus_offered_meets_budget_and_target(engine, mnist_onnx_path, data, tmp_path):  # noqa: F811
    narrow = engine.space.narrowest()
    all_mp = tuple(MP4 if k.kind == "weight" else b for k, b in zip(engine.space.knobs, narrow))
    budget = engine.weight_bytes(all_mp)  # all-8-bit is over it, all-4+ just fits
    kl_mp = -engine.accuracy(all_mp).accuracy
    e = _engine(mnist_onnx_path, data, tmp_path / "b.jsonl", metric="kl", accuracy_drop=kl_target(kl_mp * 1.01),
                multipoint=True, max_trials=4, cache_dir=engine.log.path.parent / "cache", max_weight_bytes=budget,
                allow_float=False)  # fp32 layers are over any budget here: fewer choices, fewer builds
    r = e.run(functools.partial(ALGORITHMS["evolve"], population=4, rounds=1))
    assert r.best is not None and r.best.weight_bytes <= budget
    assert r.met_target and -r.best.accuracy <= kl_mp * 1.01


@pytest.mark.parametrize("channels, block, extra", [(10, 1, 1), (10, 16, 6), (16, 16, 16), (320, 16, 32),
                                                     (1000, 16, 104), (24, 16, 8), (40, 4, 4)])
def test_extra_points_fill_the_kernels_last_channel_block(channels, block, extra):
    assert Multipoint(0.1, channel_block=block).extra_count(channels) == extra
    assert Multipoint(0.0, channel_block=block).extra_count(channels) == 0


def test_points_inside_the_padding_cost_no_bytes(engine):
    narrow = engine.space.narrowest()
    outs = [to_rows(engine.graph.node(k.name).weight, engine.graph.node(k.name).kind).shape[0]
            for k in engine.space.knobs]
    i = outs.index(min(outs))
    node = engine.graph.node(engine.space.knobs[i].name)
    assert node.kind == "dense" and outs[i] == 10  # the 10-way classifier: padded to 16 on VNNI
    assert len(engine.points.layers[node.name][1]["channels"]) == 6
    assert engine.weight_bytes(_with(narrow, i, MP4)) == engine.weight_bytes(narrow)
