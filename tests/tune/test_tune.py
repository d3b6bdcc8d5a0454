"""MetaSchedule tuning with the on-disk cache: bit-exact, VNNI kept, nothing tuned twice.

One realized conv+dense module (7 tasks: the two VNNI kernels, the NCHW16c
layout converts, requantize and quantize) is tuned once per session with a
tiny budget into a temporary cache; the other tests reuse that cache. Budgets
stay at a few trials per task: this is about plumbing, not speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.llvm
needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")

TRIALS = 1  # per task: plumbing, not speed (a second trial per task cost the suite ~8 s)
KEY = "test-vnni"


@pytest.fixture(scope="module")
def target():
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})


@pytest.fixture(scope="module")
def int_mod():
    """A tiny conv -> relu -> dense torch model, quantized and realized for x86 VNNI at batch 1."""
    import torch
    from torch import nn

    from hago.backends import get_backend
    from hago.build import static_batch
    from hago.compiler import quantize
    from hago.graph import analyze
    from hago.realize import realize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32)).eval()
    calib = {"input": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    q = quantize(model, "x86-avx512-vnni", calib, example_inputs=(torch.zeros(1, 3, 8, 8),))
    static = static_batch(q.fp32, 1)
    return realize(analyze(static), q.strategy, "fixed_point", get_backend("x86")).mod


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)


def _run(ex, x):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _objdump(ex, path) -> str:
    ex.export_library(str(path))
    return subprocess.run(["objdump", "-d", str(path)], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def reference(int_mod, target, x):
    from hago.build import build

    return _run(build(int_mod, target, "test"), x)


@pytest.fixture(scope="module")
def tuned(int_mod, target, tmp_path_factory):
    """``(cache_dir, Tuned)`` of the first, cold tuning run."""
    from hago.tune import tune_and_build

    cache = tmp_path_factory.mktemp("tuning_cache")
    return cache, tune_and_build(int_mod, target, trials=TRIALS, cache_dir=cache, device_key=KEY, progress=False)


def test_tuned_build_is_bit_exact_and_keeps_vnni(tuned, reference, x):
    _, (ex, stats) = tuned
    assert stats.tasks >= 4 and stats.tuned_tasks == stats.tasks and stats.reused_tasks == 0
    assert 0 < stats.new_trials <= TRIALS * stats.tasks
    np.testing.assert_array_equal(_run(ex, x), reference)
    assert "vpdpbusd" in ex.mod.imports[0].inspect_source("asm")


def test_cache_layout_and_default_records(tuned):
    cache, (_, stats) = tuned
    metas = [json.loads(p.read_text()) for p in cache.glob(f"v*/{KEY}/*/meta.json")]
    assert len(metas) == stats.tasks and all(m["budget"] == TRIALS for m in metas)
    assert all(m["key"]["schema"] == 1 and "cascadelake" in m["key"]["target"] for m in metas)
    kernels = [m for m in metas if m["task"].startswith("hago_")]
    # the hand-written schedule of every VNNI kernel was measured and committed first
    assert kernels and all(m["default_ms"] is not None for m in kernels)
    # and so was hago.lower's default for the fused element-wise tasks: tuning starts from the untuned build
    fused = [m for m in metas if m["task"].startswith("fused_") and "conv2d" not in m["task"]]
    assert fused and all(m["default_ms"] is not None for m in fused), [(m["task"], m["default_ms"]) for m in fused]


def test_second_build_makes_no_trials(tuned, int_mod, target, reference, x):
    from hago.tune import tune_and_build

    cache, (_, first) = tuned
    ex, stats = tune_and_build(int_mod, target, trials=TRIALS, cache_dir=cache, device_key=KEY, progress=False)
    assert stats.new_trials == 0 and stats.tuned_tasks == 0 and stats.reused_tasks == first.tasks
    np.testing.assert_array_equal(_run(ex, x), reference)


def test_changed_default_schedule_is_committed_again(tuned, int_mod, target, reference, x):
    """A cached workload whose default schedule changed since (hago's defaults improved) gets the new one
    measured and committed as a record, with no search trials: a tuned build is never slower than untuned."""
    from hago.tune import tune_and_build

    cache, (_, first) = tuned
    path = next(p for p in cache.glob(f"v*/{KEY}/*/meta.json") if json.loads(p.read_text())["task"].startswith("hago_"))
    meta = json.loads(path.read_text())
    records = (path.parent / "database_tuning_record.json").read_text().count("\n")
    path.write_text(json.dumps({**meta, "default_schedule": "an older default"}))
    ex, stats = tune_and_build(int_mod, target, trials=TRIALS, cache_dir=cache, device_key=KEY, progress=False)
    assert stats.new_trials == 0 and stats.tuned_tasks == 1 and stats.reused_tasks == first.tasks - 1
    assert json.loads(path.read_text())["default_schedule"] == meta["default_schedule"]
    assert (path.parent / "database_tuning_record.json").read_text().count("\n") == records + 1
    np.testing.assert_array_equal(_run(ex, x), reference)


@needs_objdump
def test_untuned_build_reuses_cache(tuned, int_mod, target, reference, x, tmp_path):
    from hago.tune import tune_and_build

    cache, (_, first) = tuned
    ex, stats = tune_and_build(int_mod, target, trials=0, cache_dir=cache, device_key=KEY, progress=False)
    assert stats.new_trials == 0 and stats.reused_tasks == first.tasks
    np.testing.assert_array_equal(_run(ex, x), reference)
    assert "vpdpbusd" in _objdump(ex, tmp_path / "cached.so")


@needs_objdump
def test_untuned_build_without_cache_has_vnni(int_mod, target, reference, x, tmp_path):
    from hago.tune import tune_and_build

    ex, stats = tune_and_build(int_mod, target, trials=0, cache_dir=tmp_path / "empty", device_key=KEY,
                               progress=False)
    assert stats.new_trials == 0 and stats.reused_tasks == 0
    np.testing.assert_array_equal(_run(ex, x), reference)
    assert "vpdpbusd" in _objdump(ex, tmp_path / "untuned.so")


def test_cache_is_keyed_by_device_and_target(tuned, int_mod, target, x):
    import tvm

    from hago.tune import tune_and_build

    cache, _ = tuned
    _, other_key = tune_and_build(int_mod, target, trials=0, cache_dir=cache, device_key="another-board",
                                  progress=False)
    assert other_key.reused_tasks == 0
    zen = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    _, other_target = tune_and_build(int_mod, zen, trials=0, cache_dir=cache, device_key=KEY, progress=False)
    assert other_target.reused_tasks == 0


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    from hago.tune import default_cache_dir

    monkeypatch.setenv("HAGO_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("HAGO_CACHE_DIR")
    assert default_cache_dir().parts[-3:] == (".cache", "hago", "tuning")


def test_rejects_gpu_targets_and_negative_budgets(int_mod, target, tmp_path):
    import tvm

    from hago.errors import BuildError
    from hago.tune import tune_and_build

    with pytest.raises(BuildError, match="LLVM"):
        tune_and_build(int_mod, tvm.target.Target({"kind": "cuda", "arch": "sm_75"}), trials=1,
                       cache_dir=tmp_path, device_key=KEY)
    with pytest.raises(BuildError, match=">= 0"):
        tune_and_build(int_mod, target, trials=-1, cache_dir=tmp_path, device_key=KEY)


def _dense_module(m: int = 4, k: int = 64, n: int = 32):
    from tvm import relax

    from hago.backends.x86.kernels import emit_dense_vnni

    w = np.random.default_rng(2).integers(-128, 128, (k, n), dtype=np.int8)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((m, k), "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(emit_dense_vnni(bb, xv, w))
        bb.emit_func_output(out)
    return bb.get(), w


@pytest.mark.rpc
def test_tune_through_rpc_runner(rpc_tracker, target, tmp_path):
    from hago.tune import rpc_runner, tune_and_build

    tracker, key = rpc_tracker
    mod, w = _dense_module()
    ex, stats = tune_and_build(mod, target, trials=4, cache_dir=tmp_path, device_key="rpc-" + key,
                               runner=rpc_runner(tracker, key), progress=False)
    assert stats.tuned_tasks == stats.tasks == 1 and 0 < stats.new_trials <= 4
    xs = np.random.default_rng(3).integers(0, 256, (4, 64), dtype=np.uint8)
    import tvm
    from tvm import relax

    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs)).numpy()
    np.testing.assert_array_equal(got, (xs.astype(np.int64) @ w.astype(np.int64)).astype(np.int32))


@pytest.mark.rpc
def test_rpc_runner_refuses_unknown_key(rpc_tracker):
    from hago.errors import MeasureError
    from hago.tune import rpc_runner

    with pytest.raises(MeasureError, match="no RPC server registered"):
        rpc_runner(rpc_tracker[0], "no-such-board")


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs the aarch64 cross toolchain")
def test_cross_compiled_candidates_are_aarch64_libraries():
    """For a Pi the builder links each candidate with the spec's cross compiler (no compiler on the board)."""
    from hago.build import target_of
    from hago.hwspec import HardwareSpec
    from hago.tune.candidates import build_candidate

    spec = HardwareSpec.load("rpi4")
    mod, _ = _dense_module()
    func = next(f for gv, f in mod.functions_items() if gv.name_hint == "hago_dense_vnni")
    import tvm

    path = build_candidate(spec.cross_compiler, tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                           target_of(spec))
    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    shutil.rmtree(path.rsplit("/", 1)[0], ignore_errors=True)


def test_options_for_specs():
    from hago.errors import BuildError
    from hago.hwspec import HardwareSpec
    from hago.tune import TuneOptions

    local = TuneOptions.for_spec(HardwareSpec.load("x86-avx512-vnni"), 8)
    assert (local.trials, local.device_key, local.rpc, local.cross_compiler) == (8, "x86-avx512-vnni", None, None)
    pi = HardwareSpec.load("rpi4")
    assert TuneOptions.for_spec(pi, 0).rpc is None  # untuned: cached schedules only, no board needed
    with pytest.raises(BuildError, match="--rpc"):
        TuneOptions.for_spec(pi, 4)
    remote = TuneOptions.for_spec(pi, 4, tracker="127.0.0.1:9190")
    assert remote.rpc == ("127.0.0.1:9190", pi.rpc.key) and remote.cross_compiler == pi.cross_compiler
