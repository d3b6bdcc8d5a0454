"""hago.frontend: real MNIST through both import routes, plus every user error as one line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from tvm import relax

from hago import frontend
from hago.data import InputInfo
from hago.errors import FrontendError

MNIST_INPUT = [InputInfo("input", (None, 1, 28, 28), "float32")]


def _assert_matches_torch(logits: np.ndarray, ref: np.ndarray) -> None:
    assert logits.shape == ref.shape
    assert np.abs(logits - ref).max() < 1e-4
    assert np.array_equal(logits.argmax(1), ref.argmax(1))


def _one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.llvm
def test_torch_route_matches_torch(mnist_model, mnist_ref, run_tvm):
    x, ref = mnist_ref
    mod = frontend.load_model(mnist_model, torch.from_numpy(x[:1]))
    assert frontend.input_infos(mod) == MNIST_INPUT
    assert isinstance(mod["main"].ret_ty, relax.TensorType)  # 1-tuple unwrapped
    assert not mnist_model.training
    _assert_matches_torch(run_tvm(mod, x), ref)


@pytest.mark.llvm
def test_onnx_route_matches_torch(mnist_onnx_path, mnist_ref, run_tvm):
    x, ref = mnist_ref
    mod = frontend.load_model(mnist_onnx_path)
    assert frontend.input_infos(mod) == MNIST_INPUT
    _assert_matches_torch(run_tvm(mod, x), ref)


@pytest.mark.slow
def test_torch_fp32_accuracy_full_test_set(mnist_model, mnist_test):
    x, y = mnist_test
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    with torch.no_grad():
        pred = torch.cat([mnist_model(torch.from_numpy(x[i:i + 2000])).argmax(1)
                          for i in range(0, len(x), 2000)]).numpy()
    assert int((pred == y).sum()) == 9905  # 99.05%


def test_onnx_input_shapes_override(mnist_onnx_path):
    mod = frontend.load_model(mnist_onnx_path, input_shapes={"input": [8, 1, 28, 28]})
    assert frontend.input_infos(mod) == [InputInfo("input", (8, 1, 28, 28), "float32")]


def test_torch_input_shapes_gives_dynamic_batch(mnist_model):
    mod = frontend.load_model(mnist_model, input_shapes=[(1, 1, 28, 28)])
    assert frontend.input_infos(mod) == MNIST_INPUT


def test_torch_static_fallback_when_batch_is_baked_in():
    class FixedBatch(nn.Module):
        def forward(self, x):
            return x.reshape(3, -1).relu()  # a reshape that specialises the batch dim

    mod = frontend.load_model(FixedBatch(), torch.randn(3, 4))
    assert frontend.input_infos(mod)[0].shape == (3, 4)


def test_irmodule_is_canonicalized():
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):  # no dataflow block, 1-tuple output
        y = bb.emit(relax.op.add(x, x))
        out = bb.emit(relax.Tuple([y]))
        bb.emit_func_output(out)
    raw = bb.get()
    mod = frontend.load_model(raw)
    assert isinstance(mod["main"].ret_ty, relax.TensorType)
    assert any(isinstance(b, relax.DataflowBlock) for b in mod["main"].body.blocks)
    assert isinstance(raw["main"].ret_ty, relax.TupleType)  # the caller's module is untouched


def test_missing_file():
    with pytest.raises(FrontendError) as exc:
        frontend.load_model("/nonexistent/model.onnx")
    assert "does not exist" in _one_line_error(exc)


def test_garbage_onnx(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\xffthis is not a protobuf\xde\xad\xbe\xef" * 8)
    with pytest.raises(FrontendError) as exc:
        frontend.load_model(path)
    assert "not a valid ONNX model" in _one_line_error(exc)


def test_not_onnx_suffix(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    with pytest.raises(FrontendError) as exc:
        frontend.load_model(path)
    assert "not an .onnx file" in _one_line_error(exc)


def test_unsupported_onnx_op(tmp_path):
    # Col2Im (opset 18) is a valid ONNX op that TVM 0.27's importer lacks.
    graph = helper.make_graph(
        [helper.make_node("Col2Im", ["x", "image_shape", "block_shape"], ["y"])],
        "col2im",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
        initializer=[helper.make_tensor("image_shape", TensorProto.INT64, [2], [4, 4]),
                     helper.make_tensor("block_shape", TensorProto.INT64, [2], [2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    path = tmp_path / "col2im.onnx"
    onnx.save(model, path)
    with pytest.raises(FrontendError) as exc:
        frontend.load_model(path)
    msg = _one_line_error(exc)
    assert "Col2Im" in msg and "not support" in msg


def test_torch_export_failure():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return x * 2
            return x

    model = DataDependent().train()
    with pytest.raises(FrontendError) as exc:
        frontend.load_model(model, torch.randn(2, 3))
    assert "torch.export failed for DataDependent" in _one_line_error(exc)
    assert model.training  # mode restored after the eval-mode export


def test_torch_needs_examples(mnist_model):
    with pytest.raises(FrontendError) as exc:
        frontend.load_model(mnist_model)
    assert "example_inputs" in _one_line_error(exc)


def test_unsupported_model_type():
    with pytest.raises(FrontendError) as exc:
        frontend.load_model(42)
    assert "int" in _one_line_error(exc)


def test_onnx_input_shapes_unknown_name(mnist_onnx_path):
    with pytest.raises(FrontendError) as exc:
        frontend.load_model(mnist_onnx_path, input_shapes={"image": [1, 1, 28, 28]})
    assert "its inputs are: input" in _one_line_error(exc)
