"""The public API: ``import hago; hago.compile(...)``, ``hago.search(...)``, ``hago.HardwareSpec.load(...)``.

``import hago`` (and ``hago --help``) must stay light: the names resolve on first use, and neither
TVM nor torch is imported until a command needs them.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import hago


def _heavy_modules(code: str) -> list[str]:
    """TVM/torch top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = (f"{code}\nimport json, sys\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'tvm', 'torch'})), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return json.loads(out.stderr.strip().splitlines()[-1])


def test_import_hago_loads_neither_tvm_nor_torch():
    assert _heavy_modules("import hago") == []


def test_help_loads_neither_tvm_nor_torch():
    code = ("import runpy, sys\nsys.argv = ['hago', '--help']\n"
            "try:\n    runpy.run_module('hago', run_name='__main__')\nexcept SystemExit:\n    pass")
    assert _heavy_modules(code) == []


def test_hago_compile_is_the_function_with_a_numpy_docstring():
    from hago.compiler import compile as compile_function

    assert inspect.isfunction(hago.compile) and hago.compile is compile_function
    assert "Parameters\n    ----------" in hago.compile.__doc__ and "Returns\n    -------" in hago.compile.__doc__


def test_hago_search_is_callable_and_stays_so_after_its_submodules_load():
    import hago.search.engine  # noqa: F401  binds the package on ``hago``, as any submodule import does
    from hago.search.run import search

    assert callable(hago.search)
    assert "Parameters\n    ----------" in search.__doc__


def test_hago_search_runs_the_search_and_refuses_bad_options_in_one_line(tmp_path):
    from hago.search.target import SearchError

    with pytest.raises(SearchError, match="unknown search algorithm 'nope'") as err:
        hago.search(tmp_path / "m.onnx", "x86-avx512-vnni", {}, {}, algorithm="nope", out_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_hardware_spec_load():
    from hago.hwspec import HardwareSpec

    assert hago.HardwareSpec is HardwareSpec
    assert hago.HardwareSpec.load("rpi4").name == "rpi4"
    assert "Parameters\n        ----------" in hago.HardwareSpec.load.__doc__


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hago.nope  # noqa: B018
    assert {"compile", "search", "HardwareSpec"} <= set(dir(hago))
