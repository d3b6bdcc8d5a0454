"""The backend registry: which backend each shipped spec and each build target gets."""

from __future__ import annotations

import sys
import subprocess

import pytest

from hago.backends import backend_of, cpu_kinds, for_target, get_backend, resolve, target_kinds
from hago.errors import SpecError
from hago.hwspec import HardwareSpec


@pytest.mark.parametrize("device,backend", [("x86-avx512-vnni", "x86"), ("x86-avx2", "x86"), ("rpi4", "arm"),
                                            ("rpi5", "arm"), ("cuda-t4", "cuda"), ("cuda-h100", "cuda")])
def test_shipped_specs_derive_their_backend(device, backend):
    assert backend_of(HardwareSpec.load(device)).name == backend


def test_derivation_from_kind_and_intrinsics():
    assert resolve(None, "llvm", ["arm-sdot"]).name == "arm"
    assert resolve(None, "llvm", []).name == "cpu"  # a generic LLVM CPU
    assert resolve(None, "llvm", ["some-future-extension"]).name == "cpu"
    assert resolve(None, "cuda", []).name == "cuda"
    assert resolve("cpu", "llvm", ["x86-vnni"]).name == "cpu"  # a named backend wins over the intrinsics
    with pytest.raises(SpecError, match="no backend builds for target kind 'opencl'"):
        resolve(None, "opencl", [])
    with pytest.raises(SpecError, match="unknown backend 'tpu'; valid: amx, arm, cpu, cuda, x86"):
        get_backend("tpu")


def test_target_kinds_are_the_registry_s():
    assert set(target_kinds()) == {"llvm", "cuda"} and cpu_kinds() == ("llvm",)


def test_what_runs_where():
    assert [get_backend(n).device for n in ("x86", "arm", "cpu", "cuda")] == ["cpu", "cpu", "cpu", "cuda"]
    assert [get_backend(n).tunable for n in ("x86", "arm", "cpu", "cuda")] == [True, True, True, False]


def test_build_without_a_backend_goes_to_the_one_that_claims_the_target():
    import tvm

    assert for_target(tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})).name == "x86"
    aarch64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}
    assert for_target(tvm.target.Target(aarch64)).name == "cpu"
    assert for_target(tvm.target.Target({"kind": "cuda", "arch": "sm_75"})).name == "cuda"


def test_loading_specs_imports_no_tvm():
    code = ("import sys; from hago.hwspec import list_devices; from hago.backends import backend_of; "
            "[backend_of(s) for s in list_devices()]; print('tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
