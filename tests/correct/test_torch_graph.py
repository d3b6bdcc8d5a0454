"""hago.correct.torch_graph: the prepared FP32 graph run in PyTorch, against ONNX Runtime on the same files.

BRECQ's block runner and its Fisher loss differentiate through this code, so
it must compute what the model computes: each model of the test corpus that
uses the ops it covers (convs, pools, squeeze-excitation, attention, layer
norm, GELU, PReLU, an embedding lookup, a channel split) agrees with ONNX
Runtime on the exported file to float32 rounding; an op it has no form for is
refused in one line that names it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import corpus
from hago.correct.torch_graph import TorchGraph
from hago.errors import QuantizeError
from hago.pipeline import prepare_model

MODELS = ["resnet_small", "mobilenetv3_block", "vit_block", "bert_layer", "grouped_conv_prelu",
          "embedding_classifier", "audio_cnn"]
PATTERNS = ["channel_split", "same_pad", "squeeze_excite", "leakyrelu"]


def _run(case, tmp_path, name):
    path = case.export(tmp_path / f"{name}.onnx")
    graph = prepare_model(str(path)).graph
    x = case.samples(3, seed=5)
    env = TorchGraph(torch, graph).run({f"input:{graph.params[0].name}": torch.from_numpy(x)})
    return env[graph.outputs[0]].numpy(), corpus.ort_run(path, x)


@pytest.mark.parametrize("name", MODELS + PATTERNS)
def test_the_torch_run_matches_onnx_runtime(name, tmp_path):
    case = corpus.CORPUS.get(name) or corpus.PATTERNS[name]
    ours, ref = _run(case, tmp_path, name)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=corpus.FP32_TOL * max(1.0, float(np.abs(ref).max())))


def test_an_op_without_a_torch_form_is_refused_in_one_line(tmp_path):
    path = corpus.PATTERNS["conv_transpose"].export(tmp_path / "t.onnx")
    with pytest.raises(QuantizeError, match="no PyTorch form for op.s. relax.nn.conv2d_transpose") as err:
        TorchGraph(torch, prepare_model(str(path)).graph)
    assert "\n" not in str(err.value)


def test_a_tensor_the_graph_cannot_take_fails_in_one_line_naming_the_node(tmp_path):
    """PyTorch's own error (here: 2 input channels where the first conv wants 3; in practice a reshape written for
    a fixed batch) becomes one line that names the node and its op, not a traceback."""
    graph = prepare_model(str(corpus.CORPUS["resnet_small"].export(tmp_path / "r.onnx"))).graph
    first = next(n for n in graph.nodes if n.weighted)
    with pytest.raises(QuantizeError, match=f"the PyTorch run of {first.name} .relax.nn.conv2d. failed") as err:
        TorchGraph(torch, graph).run({f"input:{graph.params[0].name}": torch.zeros(2, 2, 16, 16)})
    assert "\n" not in str(err.value)
