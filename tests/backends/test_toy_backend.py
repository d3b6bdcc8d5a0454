"""A new backend is a module and a registry entry: the toy backend of ``toy_backend.py``, registered here.

A spec that names it (``backend: toy``) compiles the MNIST CNN through
``hago.compile`` with no edit to compile, search, build or the CLI: the
toy plans plain integer ops, swaps nothing, builds and exports the device
library. The registry also derives the built-in generic CPU backend for an
LLVM spec with no intrinsics, and a spec is refused at load time, in one
line, for a backend name nobody registered or a descriptor layout its
backend cannot realize.
"""

from __future__ import annotations

import numpy as np
import pytest

from hago import zoo
from hago.backends import BACKENDS, backend_of, register_backend
from hago.errors import SpecError
from hago.hwspec import HardwareSpec

from toy_backend import ToyCPU

pytestmark = pytest.mark.llvm

SPEC = """\
name: toy-cpu
description: a generic LLVM CPU with no intrinsics, built by the toy backend of tests/backends
target: {kind: llvm, mcpu: x86-64, num-cores: 2}
host: null
cross_compiler: null
execution: local
rpc: null
intrinsics: []
backend: toy
ops:
  conv2d:
    - {inputs: [uint8, int8], accum: int32, output: int32, layout: NCHW, weight_layout: OIHW}
  dense:
    - {inputs: [uint8, int8], accum: int32, output: int32}
  add:
    - {inputs: [uint8, uint8], accum: int32, output: uint8}
  relu:
    - {inputs: [uint8], output: uint8}
  max_pool2d:
    - {inputs: [uint8], output: uint8}
  reshape:
    - {inputs: [uint8], output: uint8}
  default: float32
bits: {weight: [8], activation: [8]}
weights: {granularity: per_channel, symmetric: true}
activations: {granularity: per_tensor, symmetric: false}
requantize: fixed_point
"""


@pytest.fixture
def toy():
    backend = register_backend("toy", ToyCPU())
    yield backend
    del BACKENDS["toy"]


def _spec(tmp_path, text: str = SPEC) -> HardwareSpec:
    path = tmp_path / "toy-cpu.yaml"
    path.write_text(text)
    return HardwareSpec.load(path)


def test_toy_backend_compiles_mnist(toy, tmp_path, mnist_onnx_path):
    import tvm
    from tvm import relax

    import hago

    spec = _spec(tmp_path)
    assert backend_of(spec) is toy
    x, y = zoo.mnist_data("test")
    result = hago.compile(mnist_onnx_path, spec, {"input": zoo.mnist_data("train")[0][:64]},
                          eval_data={"input": x[:250], "label": y[:250]}, out_dir=tmp_path / "out", measure=False)
    # the device builds (FP32 and integer) and the export are the toy's; nothing was swapped in
    assert toy.built == ["toy-cpu", "toy-cpu"] and toy.rewritten == 2
    assert toy.exported == [tmp_path / "out" / "model.so"]
    assert result.report["ops"]["integer"] >= 8
    calls = [gv.name_hint for gv in result.realized.mod.get_global_vars()]
    assert not [c for c in calls if "vnni" in c or "depthwise" in c], calls  # the base plan: plain integer ops
    report = result.report
    assert report["quantized"]["accuracy"] >= report["fp32"]["accuracy"] - 0.02, report
    # the exported library runs and agrees with the host's evaluation build of the same program
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "out" / "model.so")), tvm.cpu())
    got = np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1])).numpy() for i in range(8)])
    want = result.extras["eval_outputs"]["quantized"][:8]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_llvm_spec_without_intrinsics_derives_the_generic_cpu_backend(tmp_path):
    spec = _spec(tmp_path, SPEC.replace("backend: toy\n", ""))
    assert backend_of(spec).name == "cpu"


def test_unknown_backend_is_one_line_at_load(tmp_path):
    with pytest.raises(SpecError) as e:
        _spec(tmp_path, SPEC.replace("backend: toy", "backend: tpu"))
    msg = str(e.value)
    assert "\n" not in msg and ":9: backend: unknown backend 'tpu'" in msg and "x86" in msg, msg


def test_unrealizable_descriptor_is_refused_at_load(toy, tmp_path):
    with pytest.raises(SpecError) as e:
        _spec(tmp_path, SPEC.replace("layout: NCHW, weight_layout: OIHW", "layout: NCHW, weight_layout: OIHW4i16o4i"))
    msg = str(e.value)
    assert "\n" not in msg and ":12: ops.conv2d[0].weight_layout: backend toy has no conv2d kernel" in msg, msg


def test_registered_backend_of_another_target_kind_is_refused(tmp_path):
    with pytest.raises(SpecError, match="backend cuda builds for target kind 'cuda'"):
        _spec(tmp_path, SPEC.replace("backend: toy", "backend: cuda"))
