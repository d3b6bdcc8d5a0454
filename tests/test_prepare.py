"""hago.prepare: batch-norm folding against torch, and the canonical form annotate relies on."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from hago import frontend, prepare
from hago.prepare import commute_constants


class ConvBN(nn.Module):
    """conv(+bias) -> BN -> relu -> conv(no bias) -> BN -> relu -> BN (not after a conv)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.bn3(torch.relu(self.bn2(self.conv2(x))))


def _conv_bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = ConvBN()
    for bn in (model.bn1, model.bn2, model.bn3):  # non-trivial inference statistics
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.data.uniform_(0.5, 2.0)
        bn.bias.data.uniform_(-1.0, 1.0)
    return model.eval()


def _bindings(mod: tvm.IRModule):
    return [b for block in mod["main"].body.blocks for b in block.bindings]


def _is_op(value, name: str) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == name


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.Constant)


def _export_onnx(model: nn.Module, x: torch.Tensor, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # no constant folding: keep BatchNormalization nodes for prepare to fold
        torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    return str(path)


@pytest.mark.llvm
@pytest.mark.parametrize("route", ["torch", "onnx"])
def test_batch_norm_folded_and_matches_torch(route, run_tvm, tmp_path):
    model = _conv_bn_model()
    x = torch.randn(6, 3, 12, 12)
    src = model if route == "torch" else _export_onnx(model, x, tmp_path / "convbn.onnx")
    raw = frontend.load_model(src, x)
    assert raw.script().count("batch_norm") == 3
    mod = prepare.prepare(raw)
    assert "batch_norm" not in mod.script()
    values = [b.value for b in _bindings(mod)]
    convs = [v for v in values if _is_op(v, "relax.nn.conv2d")]
    assert len(convs) == 2 and all(_is_const(c.args[1]) for c in convs)
    # bn1/bn2 went into the convs; bn3 (after a relu) became one multiply and one add
    assert sum(_is_op(v, "relax.multiply") for v in values) == 1
    assert sum(_is_op(v, "relax.add") for v in values) == 3
    assert not any(isinstance(v, (relax.Tuple, relax.TupleGetItem)) for v in values)
    with torch.no_grad():
        ref = model(x).numpy()
    out = run_tvm(mod, x.numpy(), batch=6)
    assert np.abs(out - ref).max() < 1e-4


def test_mnist_torch_ir_is_canonical(mnist_model):
    mod = prepare.prepare(frontend.load_model(mnist_model, torch.zeros(1, 1, 28, 28)))
    values = [b.value for b in _bindings(mod)]
    assert not any(isinstance(v, (relax.Tuple, relax.TupleGetItem)) for v in values)
    assert not any(_is_op(v, "relax.zeros_like") for v in values)  # dead pooling indices gone
    adds = [v for v in values if _is_op(v, "relax.add")]
    assert len(adds) == 4  # two conv biases, two linear biases
    assert all(_is_const(a.args[1]) and not _is_const(a.args[0]) for a in adds)
    # weights folded to constants: no permute_dims / reshape of a constant left
    assert not any(_is_op(v, "relax.permute_dims") for v in values)
    assert isinstance(mod["main"].ret_ty, relax.TensorType)


@pytest.mark.llvm
def test_prepare_keeps_mnist_numerics(mnist_model, mnist_ref, run_tvm):
    x, ref = mnist_ref
    mod = prepare.prepare(frontend.load_model(mnist_model, torch.from_numpy(x[:1])))
    out = run_tvm(mod, x[:250])
    assert np.abs(out - ref[:250]).max() < 1e-4


def test_commute_constants_structural():
    c = relax.const(np.arange(4, dtype="float32"))

    def build(const_first: bool) -> tvm.IRModule:
        x = relax.Var("x", relax.TensorType((2, 4), "float32"))
        bb = relax.BlockBuilder()
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit(relax.op.add(c, x) if const_first else relax.op.add(x, c))
                z = bb.emit(relax.op.subtract(c, y))  # not commutative: left alone
                out = bb.emit_output(z)
            bb.emit_func_output(out)
        return bb.get()

    tvm.ir.assert_structural_equal(commute_constants()(build(True)), build(False))


class PadConv(nn.Module):
    """Explicit "SAME" pads the way TF-ported nets write them, plus one pad that must stay."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.conv1(nn.functional.pad(x, (0, 1, 0, 1))))  # asymmetric zero pad
        y = self.conv2(nn.functional.pad(x, (1, 1, 2, 0)))  # stacks on the conv's own padding
        return nn.functional.pad(y, (1, 1, 1, 1), value=0.5)  # not before a conv: kept


@pytest.mark.llvm
def test_zero_pad_folds_into_conv_padding(run_tvm):
    torch.manual_seed(0)
    model = PadConv().eval()
    x = torch.randn(2, 3, 15, 15)
    mod = prepare.prepare(frontend.load_model(model, x[:1]))
    convs = [b.value for b in _bindings(mod) if _is_op(b.value, "relax.nn.conv2d")]
    pads = [b.value for b in _bindings(mod) if _is_op(b.value, "relax.nn.pad")]
    assert [list(map(int, c.attrs.padding)) for c in convs] == [[0, 0, 1, 1], [3, 2, 1, 2]]
    assert len(pads) == 1 and float(pads[0].attrs.pad_value) == 0.5
    out = run_tvm(mod, x.numpy())
    assert np.abs(out - model(x).detach().numpy()).max() < 1e-4


@pytest.mark.llvm
@pytest.mark.parametrize("parts", [2, 3, [3, 5]], ids=["sections", "uneven-sections", "indices"])
def test_split_parts_become_slices_that_compute_the_same(parts, run_tvm):
    """``split(x)[i]`` -> ``strided_slice(x)``: no tuple read is left for hago's graph, and the values agree."""
    from hago.graph import analyze

    w = np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype("float32")
    x = relax.Var("x", relax.TensorType((2, 8, 3, 3), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            tup = bb.emit(relax.op.split(x, parts, axis=1))
            ys = [bb.emit(relax.TupleGetItem(tup, i)) for i in range(2 if parts == 2 else 3)]
            last_width = 3 if isinstance(parts, list) else {2: 4, 3: 2}[parts]  # 5..8; 4..8; 6..8 (3, 3, 2)
            z = bb.emit(relax.op.nn.conv2d(ys[-1], relax.const(w[:, :last_width])))
            out = bb.emit_output(relax.op.concat([*ys, z], axis=1))
        bb.emit_func_output(out)
    mod = bb.get()
    sliced = prepare.prepare(mod)
    assert "relax.split" not in sliced.script() and "strided_slice" in sliced.script()
    conv = next(n for n in analyze(sliced).nodes if n.kind == "conv2d")
    assert conv.inputs and conv.inputs[0].startswith("n")  # the conv reads a slice's edge
    xs = np.random.default_rng(1).standard_normal((2, 8, 3, 3)).astype("float32")
    np.testing.assert_array_equal(run_tvm(sliced, xs), run_tvm(mod, xs))
    unsliced = analyze(tvm.transform.Sequential([relax.transform.FoldConstant()])(mod))
    assert not next(n for n in unsliced.nodes if n.kind == "conv2d").inputs  # what the pass is for
