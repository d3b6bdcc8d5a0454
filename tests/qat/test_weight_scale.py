"""``OpChoice.weight_scale``: a given per-channel weight scale, honoured by realize and simulate, JSON-only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from hago.errors import QuantizeError
from hago.realize.quant import fake_quantized_weight, quantize_layer_weight
from hago.strategy import OpChoice, Strategy


def _dense(codes: np.ndarray, scale: np.ndarray):
    """A dense node stand-in (``[K, N]`` weight) whose float weight is ``codes * scale`` in float32."""
    w = (codes.astype(np.float32) * scale.astype(np.float32)[None, :]).astype(np.float32)
    return SimpleNamespace(name="n1_dense", kind="dense", weight=w, bias=np.full(scale.shape, 0.25, np.float32))


def test_given_scale_gives_back_the_integers_the_max_abs_scale_would_move():
    rng = np.random.default_rng(0)
    codes = rng.integers(-5, 6, size=(64, 8))  # 4-bit codes that never reach +-7: max-abs would rescale them
    scale = rng.uniform(0.003, 0.05, size=8).astype(np.float32)
    node = _dense(codes, scale)
    derived, _ = quantize_layer_weight(node, 4, 0.02)
    assert not np.array_equal(derived, codes)
    given, qp = quantize_layer_weight(node, 4, 0.02, scale.tolist())
    np.testing.assert_array_equal(given, codes)
    np.testing.assert_array_equal(qp.scale, scale)
    assert (qp.qmin, qp.qmax, qp.axis) == (-7, 7, 1)
    np.testing.assert_array_equal(fake_quantized_weight(node, 4, 0.02, scale.tolist()), node.weight)


def test_a_scale_that_does_not_fit_the_layer_is_refused():
    node = _dense(np.ones((4, 3), np.int64), np.ones(3, np.float32))
    with pytest.raises(QuantizeError, match="weight_scale .* 2 values for 3 output channels"):
        quantize_layer_weight(node, 4, 0.1, [0.1, 0.2])


def _strategy(**op_fields) -> Strategy:
    return Strategy(graph_hash="h", device="x86-avx512-vnni",
                    ops={"n1_dense": OpChoice("dense", "integer", weight_bits=4, **op_fields)})


def test_strategies_without_it_keep_their_json_and_with_it_round_trip():
    plain = _strategy().to_json()
    assert "weight_scale" not in plain["ops"]["n1_dense"]
    assert list(plain["ops"]["n1_dense"]) == ["kind", "mode", "descriptor", "weight_bits", "reason", "bias_delta",
                                               "weight_round"]
    with_scale = _strategy(weight_scale=[0.125, 0.0078125]).to_json()
    back = Strategy.from_json(json.loads(json.dumps(with_scale)))
    assert back.ops["n1_dense"].weight_scale == [0.125, 0.0078125]
    assert back.to_json() == with_scale


@pytest.mark.parametrize("bad, msg", [([], "non-empty"), ([0.1, -0.2], "positive"), ("0.1", "list"),
                                      ([0.1, float("inf")], "finite")])
def test_bad_scales_are_refused_on_load(bad, msg):
    d = _strategy().to_json()
    d["ops"]["n1_dense"]["weight_scale"] = bad
    with pytest.raises(QuantizeError, match=rf"ops\['n1_dense'\]\.weight_scale: .*{msg}"):
        Strategy.from_json(d)


@pytest.mark.parametrize("key, value", [("multipoint", {"channels": [], "scales": [], "codes": ""}),
                                        ("weight_scale_in", [1.0, 2.0])])
def test_it_does_not_compose_with_what_sets_its_own_grid(key, value):
    d = _strategy(weight_scale=[0.1]).to_json()
    d["ops"]["n1_dense"][key] = value
    with pytest.raises(QuantizeError, match=f"weight_scale: does not compose with {key}"):
        Strategy.from_json(d)


def test_a_learned_rounding_on_the_given_grid_loads():
    """weight_clip's step with adaround's bits: the bits are relative to that step (hago.correct.rounding)."""
    d = _strategy(weight_scale=[0.1]).to_json()
    d["ops"]["n1_dense"]["weight_round"] = "eJwDAAAAAAE="
    assert Strategy.from_json(d).ops["n1_dense"].weight_round == "eJwDAAAAAAE="
