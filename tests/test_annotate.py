"""annotate follows the spec: device facts in YAML decide integer vs float."""

from __future__ import annotations

import torch
import yaml
from torch import nn

from hago.annotate import AnnotateConfig, annotate
from hago.frontend import load_model
from hago.graph import analyze, graph_hash
from hago.hwspec import HardwareSpec, spec_dir
from hago.prepare import prepare


def _graph(model, shape):
    mod = prepare(load_model(model.eval(), example_inputs=(torch.zeros(*shape),)))
    return analyze(mod), graph_hash(mod)


def _mlp():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_graph_nodes_and_fused_bias():
    g, _ = _graph(_mlp(), (2, 1, 8, 8))
    kinds = [n.kind for n in g.nodes]
    assert kinds == ["conv2d", "relu", "max_pool2d", "reshape", "dense", "other", "dense"]
    assert all(n.bias is not None for n in g.nodes if n.weighted)


def test_unsupported_op_falls_back_to_float_with_reason():
    g, h = _graph(_mlp(), (2, 1, 8, 8))
    s = annotate(g, HardwareSpec.load("x86-avx512-vnni"), h)
    tanh = next(n for n in g.nodes if n.kind == "other")
    assert s.ops[tanh.name].mode == "float"
    assert "relax.tanh" in s.ops[tanh.name].reason
    # the dense after tanh still runs in integer: its input is quantized at the float boundary
    last = g.nodes[-1]
    assert s.ops[last.name].mode == "integer"
    assert s.edges[tanh.name].bits == 8


def test_relu_range_is_observed_after_the_relu_and_passthroughs_alias():
    g, h = _graph(_mlp(), (2, 1, 8, 8))
    s = annotate(g, HardwareSpec.load("x86-avx512-vnni"), h)
    conv, relu, pool, reshape = g.nodes[:4]
    assert s.edges[conv.name].observe_at == relu.name
    assert s.edges[relu.name].alias_of == conv.name
    assert s.resolved(reshape.name) is s.edges[conv.name]


def test_spec_without_integer_dense_keeps_dense_float(tmp_path):
    data = yaml.safe_load((spec_dir() / "x86-avx512-vnni.yaml").read_text())
    data["name"] = "nodense"
    data["ops"]["dense"] = "float32"
    p = tmp_path / "nodense.yaml"
    p.write_text(yaml.safe_dump(data))
    g, h = _graph(_mlp(), (2, 1, 8, 8))
    s = annotate(g, HardwareSpec.load(p), h)
    for n in g.nodes:
        if n.kind == "dense":
            assert s.ops[n.name].mode == "float"
            assert "no integer dense" in s.ops[n.name].reason
    assert s.ops[g.nodes[0].name].mode == "integer"


def test_avx2_reduce_range_gives_7_bit_weights():
    g, h = _graph(_mlp(), (2, 1, 8, 8))
    s = annotate(g, HardwareSpec.load("x86-avx2"), h)
    assert {s.ops[n.name].weight_bits for n in g.nodes if n.weighted} == {7}


def test_signed_devices_quantize_activations_to_int8():
    g, h = _graph(_mlp(), (2, 1, 8, 8))
    s = annotate(g, HardwareSpec.load("cuda-t4"), h)
    quantized = [c for c in s.edges.values() if c.bits]
    assert quantized and {c.dtype for c in quantized} == {"int8"}
    assert all(c.symmetric for c in quantized)


def test_config_pins_float_and_bits():
    g, h = _graph(_mlp(), (2, 1, 8, 8))
    conv = g.nodes[0]
    cfg = AnnotateConfig(weight_bits=4, float_ops=frozenset({g.nodes[4].name}))
    s = annotate(g, HardwareSpec.load("x86-avx512-vnni"), h, cfg)
    assert s.ops[conv.name].weight_bits == 4
    assert s.ops[g.nodes[4].name].mode == "float"
    # a float edge forces its integer consumer to float
    cfg = AnnotateConfig(edge_bits={"input:input": 0})
    s = annotate(g, HardwareSpec.load("x86-avx512-vnni"), h, cfg)
    assert s.ops[conv.name].mode == "float"
    assert s.ops[g.nodes[1].name].mode == "float"  # relu after a float conv has nothing to gain


class _Residuals(nn.Module):
    """A float residual stream (BERT-like: input + dense) next to an all-integer residual (conv + conv)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.c1, self.c2 = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = x + self.fc(x)  # the stream x is float: quantizing this add would round it twice
        z = self.c1(y.reshape(-1, 2, 2, 2))
        return z + self.c2(z)  # both inputs are integer conv outputs: stays integer


def test_add_is_integer_only_when_all_inputs_are():
    g, h = _graph(_Residuals(), (2, 8))
    s = annotate(g, HardwareSpec.load("x86-avx512-vnni"), h)
    adds = [n for n in g.nodes if n.kind == "add"]
    assert len(adds) == 2
    assert s.ops[adds[0].name].mode == "float" and "input is float" in s.ops[adds[0].name].reason
    assert s.ops[adds[1].name].mode == "integer"
    # the float add leaves the dense dequantized from its accumulator: no 8-bit rounding of the stream
    assert not s.edges[g.producer(adds[0].inputs[1]).name].bits


class _ProjectThenFloat(nn.Module):
    """A projection reshaped into float work, BERT's Q/K/V shape: dense -> reshape -> tanh."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x).reshape(-1, 2, 4))


def test_passthrough_feeding_only_float_ops_runs_in_float():
    g, h = _graph(_ProjectThenFloat(), (3, 8))
    s = annotate(g, HardwareSpec.load("x86-avx512-vnni"), h)
    dense, reshape = (next(n for n in g.nodes if n.kind == k) for k in ("dense", "reshape"))
    assert s.ops[dense.name].mode == "integer"
    assert s.ops[reshape.name].mode == "float" and "only float" in s.ops[reshape.name].reason
    assert not s.edges[dense.name].bits  # dequantized from the int32 accumulator, no 8-bit rounding


def test_descriptor_is_the_first_whose_dtypes_hold_the_bits(tmp_path):
    """annotate reads every descriptor a spec lists: the first that holds the edge and weight bits wins."""
    g, h = _graph(_mlp(), (2, 1, 8, 8))
    conv = g.nodes[0]
    t4 = HardwareSpec.load("cuda-t4")  # int8 first, then int4: 4-bit values fit the int8 descriptor too
    for bits in (8, 4):
        s = annotate(g, t4, h, AnnotateConfig(activation_bits=bits, weight_bits=bits))
        assert s.ops[conv.name].descriptor["inputs"] == ["int8", "int8"]
    data = yaml.safe_load((spec_dir() / "cuda-t4.yaml").read_text())
    data["name"] = "int4first"
    data["ops"]["conv2d"] = data["ops"]["conv2d"][::-1]  # int4 first: 8-bit layers skip it
    p = tmp_path / "int4first.yaml"
    p.write_text(yaml.safe_dump(data))
    spec = HardwareSpec.load(p)
    assert annotate(g, spec, h).ops[conv.name].descriptor["inputs"] == ["int8", "int8"]
    assert annotate(g, spec, h, AnnotateConfig(activation_bits=4, weight_bits=4)).ops[conv.name].descriptor[
        "inputs"] == ["int4", "int4"]
    data["ops"]["conv2d"] = data["ops"]["conv2d"][:1]  # only int4: an 8-bit conv has no descriptor, stays float
    p.write_text(yaml.safe_dump(data))
    choice = annotate(g, HardwareSpec.load(p), h).ops[conv.name]
    assert choice.mode == "float" and "8-bit inputs, 8-bit weights" in choice.reason
