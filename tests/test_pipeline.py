"""One pipeline for compile and search: a model is loaded and prepared once, and the search writes its
outputs from the prepared model it holds instead of reloading the model file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hago import zoo
from hago.compiler import compile as hago_compile
from hago.compiler import quantize
from hago.pipeline import prepare_model

pytestmark = pytest.mark.llvm


@pytest.fixture(scope="module")
def calib():
    return {"input": zoo.mnist_data("valid")[0][:96]}


def _no_reload(monkeypatch):
    import hago.frontend
    import hago.pipeline

    def refuse(*a, **k):
        raise AssertionError("the model was imported again")

    monkeypatch.setattr(hago.frontend, "import_model", refuse)
    monkeypatch.setattr(hago.pipeline, "import_model", refuse)


def test_a_prepared_model_serves_several_strategies_without_reloading(mnist_onnx_path, calib, monkeypatch):
    prepared = prepare_model(mnist_onnx_path, calib)
    assert prepared.calib is not None and len(prepared.calib) == 96
    _no_reload(monkeypatch)
    a = quantize(prepared, "x86-avx512-vnni", calibrator="minmax")
    b = quantize(prepared, "x86-avx512-vnni", calibrator="mse")
    assert a.graph_hash == b.graph_hash == prepared.graph_hash
    ranges = lambda q: [e.range for e in q.strategy.edges.values() if e.range is not None]  # noqa: E731
    assert ranges(a) != ranges(b)  # both calibrated, each its own way, on the one prepared graph


def test_search_writes_its_outputs_from_the_model_it_holds(mnist_onnx_path, calib, tmp_path, monkeypatch):
    from hago.search.algorithms import ALGORITHMS
    from hago.search.engine import SearchEngine
    from hago.measure import LocalMeasurer
    from hago.search.run import write_search_outputs

    x, y = zoo.mnist_data("test")
    engine = SearchEngine(mnist_onnx_path, "x86-avx512-vnni", calib, {"input": x[:200], "label": y[:200]},
                          log_path=tmp_path / "log.jsonl", accuracy_drop="5%", max_trials=2, corrections=[],
                          measurer=LocalMeasurer(timeout_s=60, repeat=2, min_repeat_ms=10))
    result = engine.run(ALGORITHMS["latency"])
    assert result.best is not None
    _no_reload(monkeypatch)
    out = tmp_path / "out"
    write_search_outputs(engine, result, out)
    report = json.loads((out / "report.json").read_text())
    assert report["quantized"]["accuracy"] == result.best.accuracy and report["eval_samples"] == 200
    assert report["graph_hash"] == engine.ghash
    monkeypatch.undo()
    replayed = hago_compile(mnist_onnx_path, "x86-avx512-vnni", strategy=out / "strategy.json", measure=False)
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cpu())
    direct = relax.VirtualMachine(replayed.int_executable, tvm.cpu())
    xt = tvm.runtime.tensor(np.ascontiguousarray(x[:1]))
    np.testing.assert_array_equal(vm["main"](xt).numpy(), direct["main"](xt).numpy())
