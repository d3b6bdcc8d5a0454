"""BRECQ (hago.correct.brecq) on transformer layers: attention and MLP sublayers as residual blocks.

The blocks run through hago.correct.torch_graph, their dense inputs quantized per
row at run time as hago.dynamic does; a BERT's attention mask, computed once
outside every layer, is a side input of each attention block.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from corpus import TransformerLayer
from hago.annotate import AnnotateConfig
from hago.compiler import quantize
from hago.correct import CorrectionContext
from hago.correct.adaround import fp32_edges
from hago.correct.blocks import find_blocks
from hago.correct.brecq import BlockRunner, Brecq
from hago.frontend import load_model

pytestmark = pytest.mark.llvm
DEVICE = "x86-avx512-vnni"


def _realized_error(run_tvm, net, q, test) -> float:
    with torch.no_grad():
        ref = net(torch.from_numpy(test)).numpy()
    return float(((run_tvm(q.realized.mod, test) - ref) ** 2).mean())


def test_transformer_sublayers_are_blocks_and_learning_them_lowers_the_error(run_tvm, cpu_target):
    """A BERT encoder layer at 4-bit weights: attention (Q, K, V, out) and the MLP (fc1, fc2) are two residual
    blocks, their dense inputs quantized per row at run time (hago.dynamic); learned jointly, the realized
    program's error on unseen tokens falls well below round-to-nearest's (registration, 150 steps a block:
    5.7e-4 -> 3.7e-4)."""
    torch.manual_seed(0)
    net = TransformerLayer(32, 2).eval()
    rng = np.random.default_rng(3)
    calib, test = (rng.standard_normal((64, 8, 32)).astype(np.float32) for _ in range(2))
    mod = load_model(net, example_inputs=(torch.from_numpy(calib[:2]),))
    rtn = quantize(mod, DEVICE, calib, annotate_config=AnnotateConfig(weight_bits=4), corrections=())
    kinds = {n.name: n.kind for n in rtn.graph.nodes}
    blocks = find_blocks(rtn.graph, rtn.strategy)
    shape = [(b.kind, sum(kinds[n] == "dense" for n in b.nodes), kinds[b.nodes[-1]]) for b in blocks]
    assert shape == [("residual", 4, "add"), ("residual", 2, "add")], shape
    dynamic = [e for e in rtn.strategy.edges if rtn.strategy.resolved(e).dynamic]
    assert any(e in b.nodes for b in blocks for e in dynamic)  # the per-row inputs are inside the blocks
    ctx = CorrectionContext(rtn.fp32, rtn.graph, copy.deepcopy(rtn.strategy), rtn.prepared.calib, cpu_target, 32)
    report = Brecq(iters=150).run(ctx)
    assert report["residual"] == 2 and report["learned"] == 2, report
    ctx.strategy.corrections.append("brecq")
    learned = quantize(rtn.prepared, DEVICE, strategy=ctx.strategy)
    err = {k: _realized_error(run_tvm, net, q, test) for k, q in (("rtn", rtn), ("brecq", learned))}
    assert err["brecq"] < 0.8 * err["rtn"], err


class MaskedAttention(nn.Module):
    """``x + out(softmax(q k^T / 4 + bias) v)``, ``bias = (1 - mask) * -1e4`` made once from a second input, as
    a BERT adds its attention mask in every layer; then a ReLU MLP with its own residual."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, mask):
        bias = ((1.0 - mask) * -1e4)[:, None, :]
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4 + bias, -1)
        x = x + self.o(a @ self.v(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


def _context(q, target) -> CorrectionContext:
    """A correction context on a copy of ``q``'s strategy (the fixture's stays as it was)."""
    return CorrectionContext(q.fp32, q.graph, copy.deepcopy(q.strategy), q.prepared.calib, target, 32)


@pytest.fixture(scope="module")
def masked():
    """:class:`MaskedAttention` at 4-bit weights, rounded to nearest, on 32 random token sets and masks."""
    torch.manual_seed(0)
    net = MaskedAttention().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6, 16)).astype(np.float32)
    mask = (rng.random((32, 6)) > 0.3).astype(np.float32)
    mod = load_model(net, example_inputs=(torch.from_numpy(x[:2]), torch.from_numpy(mask[:2])))
    return quantize(mod, DEVICE, {"x": x, "mask": mask}, annotate_config=AnnotateConfig(weight_bits=4),
                    corrections=())


def test_a_mask_made_outside_the_block_is_read_as_a_side_input(masked, cpu_target):
    """The attention block reads the mask bias computed outside it (a side edge): it is still one block, and
    run with FP32 weights on the probe's FP32 tensors it gives the FP32 block output (the wiring is right)."""
    blocks = find_blocks(masked.graph, masked.strategy)
    attn = next(b for b in blocks if sum(masked.graph.node(n).kind == "dense" for n in b.nodes) == 4)
    assert attn.kind == "residual" and len(attn.side) == 1 and attn.side[0] not in attn.nodes
    ctx = _context(masked, cpu_target)
    fp32 = fp32_edges(ctx, [attn.input, attn.output, *attn.side], 32)
    for e in ctx.strategy.edges.values():  # no rounding anywhere: the runner must reproduce the FP32 block
        e.bits, e.qparams, e.dynamic = 0, None, False
    run = BlockRunner(torch, ctx, attn, {e: fp32[e] for e in attn.side})
    with torch.no_grad():
        out = run(torch.from_numpy(fp32[attn.input]), {})
        part = run(torch.from_numpy(fp32[attn.input][4:12]), {}, rows=torch.arange(4, 12))
    np.testing.assert_allclose(out.numpy(), fp32[attn.output], atol=1e-4)
    np.testing.assert_allclose(part.numpy(), fp32[attn.output][4:12], atol=1e-4)
    report = Brecq(iters=50).run(dataclasses.replace(ctx, strategy=copy.deepcopy(masked.strategy)))
    assert report["residual"] == 2, report


def test_the_fisher_loss_refuses_a_network_it_cannot_run_in_one_line(tmp_path):
    """``brecq_fisher`` needs the whole network in PyTorch: a transposed conv (no PyTorch form in
    hago.correct.torch_graph) is named in one line, with the way out (``brecq``)."""
    import corpus
    from hago.errors import QuantizeError

    case = corpus.PATTERNS["conv_transpose"]
    path = case.export(tmp_path / "t.onnx")
    with pytest.raises(QuantizeError, match="brecq_fisher needs the whole network in PyTorch") as err:
        quantize(str(path), DEVICE, {"x": case.samples(16)}, annotate_config=AnnotateConfig(weight_bits=4),
                 corrections=["brecq_fisher"])
    assert "relax.nn.conv2d_transpose" in str(err.value) and "use brecq" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_block_pytorch_cannot_run_keeps_round_to_nearest_and_says_so(masked, cpu_target, monkeypatch, caplog):
    """An op refused when it runs (here softmax, made to fail as an attribute PyTorch has no form for would):
    that block keeps round to nearest with one warning line; the others still learn."""
    import logging

    import hago.correct.torch_graph as tg
    from hago.errors import QuantizeError

    def refuse(torch, call, x):
        raise QuantizeError("softmax with these attributes has no PyTorch form here")

    monkeypatch.setitem(tg.OPS, "relax.nn.softmax", refuse)
    ctx = _context(masked, cpu_target)
    with caplog.at_level(logging.WARNING, logger="hago.correct.brecq"):
        report = Brecq(iters=50).run(ctx)
    lines = [r.getMessage() for r in caplog.records if "kept round to nearest" in r.getMessage()]
    assert len(lines) == 1 and "softmax" in lines[0] and "\n" not in lines[0]
    assert report["residual"] == 2 and report["learned"] == 1, report
