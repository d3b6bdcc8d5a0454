"""The search engine on the real MNIST CNN, with small budgets."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hago import zoo
from hago.search.algorithms import ALGORITHMS
from hago.search.engine import SearchEngine
from hago.measure import LocalMeasurer

from .conftest import reference_dir, warm_copy

pytestmark = [pytest.mark.llvm, pytest.mark.slow, pytest.mark.usefixtures("reference")]
N_EVAL = 300


@pytest.fixture(scope="module")
def data(mnist_test):
    xv, _ = zoo.mnist_data("valid")
    x, y = mnist_test
    return {"input": xv[:128]}, {"input": x[:N_EVAL], "label": y[:N_EVAL]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_onnx_path, data):
    """``data``'s reference cache (calibration, ``bias`` corrections, FP32 outputs), computed once. Also put
    in the session cache, which engines without a ``cache_dir`` use (they would compute the same files, and
    they are keyed by the graph and data); tests that need an empty kernel cache copy it (``warm_copy``)."""
    ref = reference_dir(mnist_onnx_path, data, tmp_path_factory.mktemp("search_reference"))
    shutil.copytree(ref, Path(os.environ["HAGO_CACHE_DIR"]) / "reference", dirs_exist_ok=True)
    return ref


class KernelSumMeasurer:
    """A noiseless device: a run costs 1 ms per float conv/matmul call and 0.01 ms per other call.

    Greedy and the cost-model search can then be compared on latency exactly, not through a shared,
    noisy timer; the calls are the real build's calls, so the kernel cache sees what it would see."""

    name = "kernel-sum"

    def __init__(self):
        self.calls = 0

    def measure(self, lib_path, inputs):
        import tvm
        from tvm import relax

        from hago.measure import Measurement
        from hago.search.kernelcache import profile_calls

        self.calls += 1
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
        args = [tvm.runtime.tensor(np.zeros(s, d)) for s, d in inputs]
        calls = []
        for sig, _ in profile_calls(vm, args, runs=1):
            name, first = sig.split("(")[0], sig.split("(")[1].split(",")[0]
            heavy = ("conv2d" in name or "matmul" in name) and "vnni" not in name and first.endswith("float32")
            calls.append((sig, 1.0 if heavy else 0.01))
        return Measurement(sum(t for _, t in calls), 0.0, 1, kernels=tuple(calls))


def _engine(onnx, data, log, **kw):
    """An engine on the MNIST CNN; by default on the noiseless :class:`KernelSumMeasurer`, in this process:
    what these tests check (choices, logs, corrections) must not hang on a timer shared with other jobs, and a
    measuring child costs a TVM import per engine (the real local measurer: ``tests/measure/test_local.py``,
    and the hung/crashed test below)."""
    kw.setdefault("measurer", KernelSumMeasurer())
    return SearchEngine(onnx, "x86-avx512-vnni", data[0], data[1], log_path=log, **kw)


def _latency_lines(log: Path) -> list[str]:
    return [json.loads(l)["key"] for l in log.read_text().splitlines()[1:] if l.startswith('{"key": "latency|')]


def test_result_meets_target_and_is_the_fastest_that_does(mnist_onnx_path, data, tmp_path):
    e = _engine(mnist_onnx_path, data, tmp_path / "s.jsonl", accuracy_drop="1%", max_trials=5)
    r = e.run(functools.partial(ALGORITHMS["evolve"], population=4, rounds=2))
    assert r.met_target and r.best.accuracy >= r.threshold
    good = [c for c in r.candidates if c.latency_ms is not None and c.accuracy >= r.threshold]
    assert r.best.latency_ms <= min(c.latency_ms for c in good) * (1 + e.tie_tolerance)
    assert r.fp32 is not None and r.fp32.latency_ms is not None  # FP32 is always a measured candidate
    assert r.best.latency_ms < r.fp32.latency_ms  # integer kernels cost 0.01 ms a call, float convs/matmuls 1 ms
    assert 0 < r.trials <= 5
    assert len(_latency_lines(tmp_path / "s.jsonl")) == r.trials


def test_latency_aware_search_starts_fast_and_stops_at_the_target(mnist_onnx_path, data, tmp_path):
    e = _engine(mnist_onnx_path, data, tmp_path / "l.jsonl", accuracy_drop="2%", max_trials=4)
    r = e.run(ALGORITHMS["latency"])
    assert r.met_target
    # 4-bit weights already meet a 2% drop on MNIST: the narrowest point is the answer
    assert r.best.point == e.space.narrowest()


def test_impossible_target_returns_best_with_message(mnist_onnx_path, data, tmp_path):
    # uncorrected: with bias correction at 4 bits (run per weight width since session 12) the all-4-bit
    # build can agree with FP32 on every one of these few images, and the target is no longer impossible
    e = _engine(mnist_onnx_path, (data[0], {"input": data[1]["input"]}), tmp_path / "i.jsonl",
                accuracy_drop="0%", allow_float=False, weight_bits=[4], max_trials=3, corrections=())
    assert e.space.size == 1
    r = e.run(ALGORITHMS["evolve"])
    assert not r.met_target and r.best is not None
    assert "no candidate met the target" in r.message and "agreement" in r.message


FAKE_WORKER = """
import json, os, resource, sys, time
import tvm  # imported before "ready", as the real worker does: the time-out is for the measurement alone
from hago.measure.worker import measure
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dump: the abort below dies at once
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["lib"].endswith("cand_0.so"):
        time.sleep(120)  # a hung kernel
    if req["lib"].endswith("cand_1.so"):
        os.abort()  # a crashing kernel
    print(json.dumps(measure(req)), flush=True)
"""


def test_hung_and_crashed_measurements_are_logged_and_skipped(mnist_onnx_path, data, reference, tmp_path):
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    # the hung kernel costs the whole time-out; a real measurement here takes well under a second
    m = LocalMeasurer(timeout_s=3, repeat=3, min_repeat_ms=30, command=[sys.executable, str(fake)])
    e = _engine(mnist_onnx_path, data, tmp_path / "h.jsonl", measurer=m, accuracy_drop="1%", max_trials=4,
                cache_dir=warm_copy(reference, tmp_path / "cache"))
    t0 = time.time()
    r = e.run(ALGORITHMS["greedy"])
    errors = [c.error for c in r.candidates if c.error]
    assert any("timed out" in err for err in errors)
    assert any("died" in err for err in errors)
    assert r.best is not None and r.best.error is None and r.met_target
    assert r.trials == 4 and time.time() - t0 < 120


def test_kernel_cache_estimates_a_candidate_from_shared_kernels(mnist_onnx_path, data, reference, tmp_path):
    """A layer whose 8- and 4-bit weights run the same int8 kernel: measuring one prices the other without the
    device.

    (On VNNI a 4-bit dense and a 4-bit conv with more than 4 input channels run the packed 4-bit kernels,
    different ones: ``narrow`` narrows only the 1-channel first conv, which keeps the int8 kernel at 4 bits.)"""
    e = _engine(mnist_onnx_path, data, tmp_path / "c.jsonl", cache_dir=warm_copy(reference, tmp_path / "cache"),
                max_trials=2)
    wide = e.space.widest()

    def shares_kernel(name):
        node = e.graph.node(name)
        return node.kind == "conv2d" and node.weight.shape[1] <= 4

    narrow = tuple(4 if k.kind == "weight" and shares_kernel(k.name) else w for k, w in zip(e.space.knobs, wide))
    assert wide != narrow
    assert e.estimate(narrow) is None  # nothing measured yet
    measured = e.latency(wide)
    cache = json.loads((tmp_path / "cache" / "kernels" / "x86-avx512-vnni.json").read_text())
    assert cache["schema"] == 2 and len(cache["kernels"]) >= 4
    est = e.estimate(narrow)
    assert est is not None
    # the same kernel calls, so the estimate is the measured run: kernel times plus the VM's overhead
    assert est == pytest.approx(measured.latency_ms, rel=1e-6)
    assert e.estimate(wide) == pytest.approx(est) and e._signatures[narrow] == e._signatures[wide]
    assert e.trials == 1  # priced without a second device measurement
    # a float layer brings float kernels nobody has measured yet
    assert e.estimate(e.space.all_float()) is None


def test_cost_model_search_matches_greedy_with_fewer_measurements(mnist_onnx_path, data, reference, tmp_path):
    results, engines = {}, {}
    for name in ("greedy", "evolve"):
        m = KernelSumMeasurer()
        small = (data[0], {k: v[:100] for k, v in data[1].items()})
        e = _engine(mnist_onnx_path, small, tmp_path / f"{name}.jsonl", measurer=m, accuracy_drop="1%",
                    weight_bits=[8], cache_dir=warm_copy(reference, tmp_path / f"cache_{name}"))
        engines[name], results[name] = e, (r := e.run(ALGORITHMS[name]))
        assert r.met_target and r.trials == len(_latency_lines(tmp_path / f"{name}.jsonl"))
        assert m.calls == r.trials + e.retimed  # and the contenders re-timed side by side (hago.search.settle)
    greedy, evolve = results["greedy"], results["evolve"]
    # greedy measures every choice of every layer; the cost model needs FP32 and the all-integer build,
    # whose kernels price every other candidate (all of them slower here)
    assert greedy.trials == 1 + len(engines["greedy"].space.knobs) + 1
    assert evolve.trials <= 3 and 3 * evolve.trials <= greedy.trials
    assert evolve.best.latency_ms <= greedy.best.latency_ms
    assert evolve.best.point == engines["evolve"].space.widest()


def test_candidates_are_bias_corrected_like_compile(mnist_onnx_path, data, reference, tmp_path):
    """Every candidate is scored as ``hago compile`` would build it: the all-8-bit candidate carries the
    same bias deltas compile's ``bias`` correction computes; a layer put back to float carries none, the
    others keep theirs; ``corrections=()`` turns it off."""
    from hago.compiler import quantize

    # the engine's bias deltas come from the reference cache, computed by an engine like this one
    e = _engine(mnist_onnx_path, data, tmp_path / "b.jsonl", cache_dir=warm_copy(reference, tmp_path / "cache"),
                max_trials=1)
    wide = e.strategy(e.space.widest())
    q = quantize(mnist_onnx_path, "x86-avx512-vnni", data[0], calibrator="mse", corrections=("bias",))
    deltas = {n: op.bias_delta for n, op in q.strategy.ops.items() if op.bias_delta is not None}
    assert deltas and wide.corrections == ["bias"]
    for name, delta in deltas.items():
        np.testing.assert_allclose(wide.ops[name].bias_delta, delta, rtol=1e-4, atol=1e-6)
    i = next(j for j, k in enumerate(e.space.knobs) if k.kind == "weight" and k.name in deltas)
    point = list(e.space.widest())
    point[i] = 0
    mixed = e.strategy(tuple(point))
    assert mixed.ops[e.space.knobs[i].name].bias_delta is None
    assert sum(op.bias_delta is not None for op in mixed.ops.values()) >= 1
    plain = _engine(mnist_onnx_path, data, tmp_path / "p.jsonl", cache_dir=tmp_path / "cache", corrections=())
    assert all(op.bias_delta is None for op in plain.strategy(plain.space.widest()).ops.values())


def test_candidates_carry_learned_rounding_like_compile(mnist_onnx_path, data, reference, tmp_path, monkeypatch):
    """``adaround_conv,bias``: the all-8-bit candidate gets compile's learned rounding bits and the bias
    deltas measured after them; a layer put back to float gets neither; a correction whose result depends
    on the other layers is refused before any work."""
    from hago.compiler import quantize
    from hago.correct.adaround import AdaRound
    from hago.search.target import SearchError

    # fewer Adam steps per layer (600 by default), for the search and compile alike: what is checked is that
    # both ship the same learned bits, not how good they are (tests/correct/test_adaround.py checks that)
    defaults = dict(zip(AdaRound.__init__.__code__.co_varnames[1:], AdaRound.__init__.__defaults__))
    monkeypatch.setattr(AdaRound.__init__, "__defaults__", tuple({**defaults, "iters": 150}.values()))
    assert AdaRound().iters == 150 and AdaRound().max_samples == defaults["max_samples"]
    names = ("adaround_conv", "bias")
    cache = warm_copy(reference, tmp_path / "cache")  # the calibration statistics; the corrections are computed
    e = _engine(mnist_onnx_path, data, tmp_path / "a.jsonl", cache_dir=cache, corrections=names)
    wide = e.strategy(e.space.widest())
    q = quantize(mnist_onnx_path, "x86-avx512-vnni", data[0], calibrator="mse", corrections=names)
    learned = {n: op for n, op in q.strategy.ops.items() if op.weight_round is not None}
    assert learned and wide.corrections == list(names)
    for name, op in learned.items():
        assert wide.ops[name].weight_round == op.weight_round
        np.testing.assert_allclose(wide.ops[name].bias_delta, op.bias_delta, rtol=1e-4, atol=1e-6)
    i = next(j for j, k in enumerate(e.space.knobs) if k.kind == "weight" and k.name in learned)
    point = list(e.space.widest())
    point[i] = 0
    mixed = e.strategy(tuple(point))
    assert mixed.ops[e.space.knobs[i].name].weight_round is None
    assert mixed.ops[e.space.knobs[i].name].bias_delta is None
    with pytest.raises(SearchError, match="bias_sequential"):
        _engine(mnist_onnx_path, data, tmp_path / "s.jsonl", cache_dir=cache, corrections=("bias_sequential",))


def test_a_space_too_large_for_len_still_reports_its_size():
    """EfficientNet-Lite0 has 50 knobs of 3 choices: 3**50 strategies overflowed ``len()`` and crashed
    ``hago search``'s summary after the search had finished."""
    from hago.search.space import Knob, SearchSpace

    space = SearchSpace(tuple(Knob(f"n{i}", "weight", (0, 4, 8)) for i in range(50)))
    assert space.size == 3**50
    assert space.size_text() == "7.18e+23"
    assert SearchSpace((Knob("a", "weight", (0, 8)),)).size_text() == "2"



def test_4bit_candidates_carry_compiles_4bit_gptq_codes(mnist_onnx_path, data, reference, tmp_path):
    """Local corrections run at the widest and at the lowest weight width: a 4-bit layer of a candidate
    ships the codes and step ``hago compile`` gives it at 4 bits, an 8-bit layer 8-bit codes of its own."""
    from hago.annotate import AnnotateConfig
    from hago.compiler import quantize
    from hago.correct import rounding

    cache = warm_copy(reference, tmp_path / "cache")
    e = _engine(mnist_onnx_path, data, tmp_path / "g.jsonl", cache_dir=cache, corrections=("gptq",))
    narrow, wide = e.strategy(e._narrowest_weights()), e.strategy(e.space.widest())
    q = quantize(mnist_onnx_path, "x86-avx512-vnni", data[0], calibrator="mse", corrections=("gptq",),
                 annotate_config=AnnotateConfig(weight_bits=4))
    coded = {n: op for n, op in q.strategy.ops.items() if op.weight_codes is not None and op.weight_bits == 4}
    assert coded
    for name, op in coded.items():
        assert narrow.ops[name].weight_bits == 4 and narrow.ops[name].weight_codes == op.weight_codes
        np.testing.assert_allclose(narrow.ops[name].weight_scale, op.weight_scale, rtol=1e-6)
        w8 = wide.ops[name]
        assert w8.weight_bits == 8 and w8.weight_codes is not None
        shape = e.graph.node(name).weight.shape
        assert np.abs(rounding.decode_codes(w8.weight_codes, shape, 8)).max() > 7  # its own, 8-bit, codes
