"""hago.safe_index: run-time indices follow ONNX semantics (wrap once, then clamp) and never leave the table.

The unit tests rewrite tiny Relax modules and run them against numpy's view of
the documented rule: ``i + n`` for ``-n <= i < 0``, then clamped to
``[0, n - 1]``. Each test checks the rewrite happened before it runs anything,
so a regression fails the assertion instead of reading out of bounds. The end
to end test exports an embedding classifier to ONNX, builds it with
``hago.compile`` and feeds the built ``model.so`` hostile token ids in a child
process, where a crash is a failed assertion instead of a dead pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from hago import frontend
from hago.prepare import prepare
from hago.safe_index import SAFE_OPS, safe_index

pytestmark = pytest.mark.llvm

N = 10  # rows of the unit tests' table
HOSTILE = np.array([0, 9, -1, -10, 10, -11, 2**40, -(2**40), 2**62, 2**32 + 3], dtype=np.int64)


def _onnx_rule(i: np.ndarray, n) -> np.ndarray:
    """ONNX's wrap-once for negatives, then hago's documented clamp."""
    i = i.astype(np.int64)
    return np.clip(np.where(i < 0, i + n, i), 0, np.asarray(n) - 1)


def _calls(mod: tvm.IRModule, name: str) -> list[relax.Call]:
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name:
            found.append(e)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _run(mod: tvm.IRModule, *args: np.ndarray):
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(a) for a in args))
    return [o.numpy() for o in out] if isinstance(out, tvm.ir.Array | list | tuple) else out.numpy()


def _module(params: list[relax.Var], body) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb))
        bb.emit_func_output(out)
    return bb.get()


TABLE = np.arange(N * 4, dtype=np.float32).reshape(N, 4)


def _embedding(mode: str = "fast", dtype: str = "int64", torch_style: bool = False) -> tvm.IRModule:
    """``take(TABLE, ids)``; ``torch_style`` casts int64 ids to int32 and flattens them first, as
    TVM's torch importer does for ``nn.Embedding``."""
    ids = relax.Var("ids", relax.TensorType((2, len(HOSTILE) // 2), dtype))

    def body(bb):
        i = ids
        if torch_style:
            i = bb.emit(relax.op.reshape(bb.emit(relax.op.astype(ids, "int32")), [-1]))
        return bb.emit(relax.op.take(relax.const(TABLE), i, axis=0, mode=mode))

    return _module([ids], body)


def test_take_wraps_negatives_once_and_clamps_the_rest():
    mod = safe_index()(_embedding())
    assert [str(c.attrs.mode) for c in _calls(mod, "relax.take")] == ["clip"]
    ids = HOSTILE.reshape(2, -1)
    np.testing.assert_array_equal(_run(mod, ids), TABLE[_onnx_rule(ids, N)])


def test_valid_indices_give_bit_identical_results():
    before = _embedding()
    after = safe_index()(before)
    assert [str(c.attrs.mode) for c in _calls(after, "relax.take")] == ["clip"]
    ids = np.random.default_rng(0).integers(0, N, (2, len(HOSTILE) // 2)).astype(np.int64)
    np.testing.assert_array_equal(_run(after, ids), _run(before, ids))


def test_an_int64_id_is_bounded_before_an_int32_cast():
    """2**40 and 2**32 + 3 truncate to 0 and 3 in int32; they must clamp to the last row instead."""
    mod = safe_index()(_embedding(torch_style=True))
    take = _calls(mod, "relax.take")
    assert [str(c.attrs.mode) for c in take] == ["clip"]
    assert _calls(mod, "relax.minimum") and str(_calls(mod, "relax.minimum")[0].ty.dtype) == "int64"
    ids = HOSTILE.reshape(2, -1)
    np.testing.assert_array_equal(_run(mod, ids), TABLE[_onnx_rule(ids.ravel(), N)])


def test_the_onnx_importers_wrap_is_not_applied_twice():
    """ONNX Gather's ``where(i < 0, i + n, i)`` stays the only wrap: -11 is out of range, not row 9."""
    ids = relax.Var("ids", relax.TensorType((len(HOSTILE),), "int64"))

    def body(bb):
        neg = bb.emit(relax.op.less(ids, relax.const(0, "int64")))
        wrapped = bb.emit(relax.op.where(neg, bb.emit(relax.op.add(ids, relax.const(N, "int64"))), ids))
        return bb.emit(relax.op.take(relax.const(TABLE), wrapped, axis=0))

    mod = safe_index()(_module([ids], body))
    assert len(_calls(mod, "relax.where")) == 1
    assert [str(c.attrs.mode) for c in _calls(mod, "relax.take")] == ["clip"]
    np.testing.assert_array_equal(_run(mod, HOSTILE), TABLE[_onnx_rule(HOSTILE, N)])


def test_the_pass_is_idempotent_and_leaves_safe_takes_alone():
    for mod in (_embedding(), _embedding(torch_style=True), _embedding(dtype="int32")):
        once = safe_index()(mod)
        tvm.ir.assert_structural_equal(safe_index()(once), once)
    wrap = _embedding(mode="wrap")  # a floor-mod is always in range
    tvm.ir.assert_structural_equal(safe_index()(wrap), wrap)
    const_ok = _module([], lambda bb: bb.emit(relax.op.take(relax.const(TABLE), relax.const(np.array([0, 9]), "int64"),
                                                            axis=0)))
    tvm.ir.assert_structural_equal(safe_index()(const_ok), const_ok)


def test_constant_indices_out_of_range_are_clamped_at_compile_time():
    mod = safe_index()(_module([], lambda bb: bb.emit(relax.op.take(
        relax.const(TABLE), relax.const(np.array([-1, 12, -30]), "int64"), axis=0))))
    np.testing.assert_array_equal(_run(mod), TABLE[[9, 9, 0]])


D54 = np.arange(20, dtype=np.float32).reshape(5, 4)


def _gather_elements(bb, i):
    return relax.op.gather_elements(relax.const(D54), i, axis=0)


def _ref_gather_elements(i):
    return np.take_along_axis(D54, _onnx_rule(i, 5), axis=0)


def _scatter_elements(bb, i):
    return relax.op.scatter_elements(relax.const(np.zeros((5, 4), np.float32)), i,
                                     relax.const(np.ones((1, 4), np.float32) * 7), axis=0)


def _ref_scatter_elements(i):
    out = np.zeros((5, 4), np.float32)
    np.put_along_axis(out, _onnx_rule(i, 5), 7.0, axis=0)
    return out


def _gather_nd(bb, i):
    return relax.op.gather_nd(relax.const(D54), i)


def _ref_gather_nd(i):
    j = _onnx_rule(i, np.array([5, 4]))
    return D54[j[:, 0], j[:, 1]]


def _scatter_nd(bb, i):
    return relax.op.scatter_nd(relax.const(np.zeros((5, 4), np.float32)), i,
                               relax.const(np.array([1, 2, 3, 4], np.float32)))


def _ref_scatter_nd(i):
    out = np.zeros((5, 4), np.float32)
    j = _onnx_rule(i, np.array([5, 4]))
    out[j[:, 0], j[:, 1]] = [1, 2, 3, 4]
    return out


def _index_tensor(bb, i):
    rows = bb.emit(relax.op.strided_slice(i, axes=[1], begin=[0], end=[1]))
    cols = bb.emit(relax.op.strided_slice(i, axes=[1], begin=[1], end=[2]))
    return relax.op.index_tensor(relax.const(D54), relax.Tuple([rows, cols]))


def _ref_index_tensor(i):
    return D54[_onnx_rule(i[:, :1], 5), _onnx_rule(i[:, 1:], 4)]


def _index_put(bb, i):
    rows = bb.emit(relax.op.reshape(bb.emit(relax.op.strided_slice(i, axes=[1], begin=[0], end=[1])), [-1]))
    cols = bb.emit(relax.op.reshape(bb.emit(relax.op.strided_slice(i, axes=[1], begin=[1], end=[2])), [-1]))
    return relax.op.index_put(relax.const(np.zeros((5, 4), np.float32)), relax.Tuple([rows, cols]),
                              relax.const(np.array([1, 2, 3, 4], np.float32)))


def _ref_index_put(i):
    out = np.zeros((5, 4), np.float32)
    out[_onnx_rule(i[:, 0], 5), _onnx_rule(i[:, 1], 4)] = [1, 2, 3, 4]
    return out


# indices chosen so that the clamped write targets stay distinct (scatter order is unspecified)
CASES = {
    "relax.gather_elements": (_gather_elements, _ref_gather_elements, [[-1, 7, 2**40, -(2**40)]]),
    "relax.scatter_elements": (_scatter_elements, _ref_scatter_elements, [[-1, 7, 2**40, -6]]),
    "relax.gather_nd": (_gather_nd, _ref_gather_nd, [[-1, -1], [7, 2], [-(2**40), 9], [2, -4]]),
    "relax.scatter_nd": (_scatter_nd, _ref_scatter_nd, [[-1, -1], [7, 2], [-(2**40), 9], [2, -5]]),
    "relax.index_tensor": (_index_tensor, _ref_index_tensor, [[-1, -1], [7, 2], [-(2**40), 9], [2, -5]]),
    "relax.index_put": (_index_put, _ref_index_put, [[-1, -1], [7, 2], [-(2**40), 9], [2, -5]]),
}


INT64_ONLY = {"relax.gather_nd"}  # Relax refuses int32 indices for it


@pytest.mark.parametrize("op,dtype", [(op, dt) for op in sorted(CASES) for dt in ("int64", "int32")
                                      if dt == "int64" or op not in INT64_ONLY])
def test_every_index_taking_op_is_bounded(op, dtype):
    build, ref, idx = CASES[op]
    idx = np.array(idx, dtype=np.int64)
    if dtype == "int32":
        idx = np.clip(idx, -(2**31), 2**31 - 1)
    idx = idx.astype(dtype)
    i = relax.Var("i", relax.TensorType(idx.shape, dtype))
    mod = safe_index()(_module([i], lambda bb: bb.emit(build(bb, i))))
    assert _calls(mod, "relax.minimum"), f"{op} was not bounded"
    np.testing.assert_array_equal(_run(mod, idx), ref(idx))


def test_every_index_taking_op_is_covered():
    assert set(CASES) | {"relax.take"} == set(SAFE_OPS)


# ---- end to end: an ONNX embedding classifier through hago.compile -------------------------------
VOCAB, DIM, SEQ, CLASSES = 30, 8, 6, 3


class EmbeddingClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc = nn.Linear(DIM, CLASSES)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


@pytest.fixture(scope="module")
def embedding_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = EmbeddingClassifier().eval()
    path = tmp_path_factory.mktemp("safe_index") / "emb.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, SEQ, dtype=torch.int64),), str(path), input_names=["ids"],
                          output_names=["logits"], dynamic_axes={"ids": {0: "N"}}, dynamo=False)
    return model, path


# one row per call (the build is batch 1): valid rows, then ONNX-defined negatives, then out of range
VALID = np.random.default_rng(1).integers(0, VOCAB, (4, SEQ))
ROWS = {
    **{f"valid{k}": VALID[k] for k in range(len(VALID))},
    "minus1": [-1] * SEQ,
    "negatives": [-1, -VOCAB, -2, 0, 5, -7],
    "vocab": [VOCAB] * SEQ,
    "big": [2**40] * SEQ,
    "minus_big": [-(2**40)] * SEQ,
    "below": [-VOCAB - 1] * SEQ,
    "mixed": [VOCAB, 2**40, -1, 0, 3, -VOCAB - 1],
    "first": [0] * SEQ,
    "mixed_clamped": [VOCAB - 1, VOCAB - 1, VOCAB - 1, 0, 3, 0],
}

_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import tvm
    from tvm import relax
    so, rows, out = sys.argv[1:]
    vm = relax.VirtualMachine(tvm.runtime.load_module(so), tvm.cpu())
    rows = np.load(rows)
    np.savez(out, **{k: vm["main"](tvm.runtime.tensor(rows[k][None])).numpy()[0] for k in rows.files})
""")


def test_built_embedding_model_never_reads_out_of_bounds(embedding_onnx, tmp_path):
    import onnxruntime as ort

    from hago.compiler import compile as hago_compile

    model, path = embedding_onnx
    calib = {"ids": np.random.default_rng(0).integers(0, VOCAB, (64, SEQ)).astype(np.int64)}
    result = hago_compile(str(path), "x86-avx512-vnni", calib, out_dir=tmp_path / "build", measure=False)
    takes = _calls(result.fp32_module, "relax.take")
    assert takes and all(str(c.attrs.mode) == "clip" for c in takes)

    rows = tmp_path / "rows.npz"
    np.savez(rows, **{k: np.asarray(v, dtype=np.int64) for k, v in ROWS.items()})
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "build" / "model.so"), str(rows),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the built model crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    got = dict(np.load(tmp_path / "out.npz"))

    sess = ort.InferenceSession(str(path))

    def onnx(row):
        return sess.run(None, {"ids": np.asarray(row, dtype=np.int64)[None]})[0][0]

    # valid ids and ONNX-defined negative ids: the integer build follows ONNX Runtime (int8 dense tolerance);
    # the FP32 build of the same prepared graph matches it to float precision
    fp32 = relax.VirtualMachine(result.fp32_executable, tvm.cpu())
    for k in [f"valid{k}" for k in range(len(VALID))] + ["minus1", "negatives"]:
        np.testing.assert_allclose(got[k], onnx(ROWS[k]), atol=2e-2, err_msg=k)
        row = tvm.runtime.tensor(np.asarray(ROWS[k], dtype=np.int64)[None])
        np.testing.assert_allclose(fp32["main"](row).numpy()[0], onnx(ROWS[k]), atol=1e-5, err_msg=k)
    with torch.no_grad():
        ref = model(torch.from_numpy(VALID)).numpy()
    np.testing.assert_allclose(np.stack([got[f"valid{k}"] for k in range(len(VALID))]), ref, atol=2e-2)

    # out of range: ONNX Runtime refuses; hago's build clamps (documented), exactly as if the id were clamped
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type
        onnx(ROWS["vocab"])
    for k, same_as in [("vocab", "minus1"), ("big", "minus1"), ("minus_big", "first"), ("below", "first"),
                       ("mixed", "mixed_clamped")]:
        np.testing.assert_array_equal(got[k], got[same_as], err_msg=k)


def test_torch_embedding_route_is_bounded_too():
    """The torch importer's ``nn.Embedding`` (int32 cast, no wrap) gets the same semantics after prepare."""
    torch.manual_seed(0)
    model = EmbeddingClassifier().eval()
    ids = torch.zeros(2, SEQ, dtype=torch.int64)
    mod = prepare(frontend.load_model(model, example_inputs=(ids,)))
    takes = _calls(mod, "relax.take")
    assert takes and all(str(c.attrs.mode) == "clip" for c in takes)
    ids = np.array([VALID[0], [-1, -VOCAB, 2**40, 2**32 + 3, VOCAB, -VOCAB - 1]], dtype=np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(_onnx_rule(ids, VOCAB))).numpy()
    np.testing.assert_allclose(_run(mod, ids), ref, atol=1e-5)
