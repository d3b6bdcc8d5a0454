"""Which specs this machine runs: refused before building, marked in ``hago devices``, ``--device host``."""

from __future__ import annotations

import pytest

from hago.backends.x86 import host
from hago.hwspec import HardwareSpec, device_table, list_devices, runs_here


@pytest.fixture
def flags(monkeypatch):
    """Pretend this machine has exactly the given CPU flags."""

    def set_flags(*names):
        monkeypatch.setattr(host, "cpu_flags", lambda: frozenset(names))
        monkeypatch.setattr(host, "is_x86_host", lambda: True)

    return set_flags


CASCADE = ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")


def test_a_spec_needing_missing_flags_is_named_with_them(flags):
    flags(*CASCADE)
    assert runs_here(HardwareSpec.load("x86-avx512-vnni")) is None
    problem = runs_here(HardwareSpec.load("x86-amx"))
    assert problem.startswith("x86-amx (mcpu sapphirerapids) cannot run on this machine: it lacks CPU flags "
                              "avx512_bf16, amx_tile, amx_int8, amx_bf16")
    assert "avx512_bf16" in runs_here(HardwareSpec.load("x86-avx512-bf16"))
    assert runs_here(HardwareSpec.load("rpi4")) is None  # remote: not this machine's business


@pytest.mark.parametrize("have,picked", [
    (CASCADE + ("avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"), "x86-amx"),
    (CASCADE + ("avx512_bf16",), "x86-avx512-bf16"),
    (CASCADE, "x86-avx512-vnni"),
    (("avx2", "fma"), "x86-avx2"),
])
def test_device_host_picks_the_best_spec_this_cpu_runs(flags, have, picked):
    flags(*have)
    assert HardwareSpec.load("host").name == picked


def test_device_host_on_a_cpu_without_avx2_is_one_line(flags):
    from hago.errors import SpecError

    flags("sse4_2")
    with pytest.raises(SpecError, match="--device host: this machine runs none of x86-amx, x86-avx512-bf16"):
        HardwareSpec.load("host")


def test_devices_marks_what_runs_here(flags):
    flags(*CASCADE)
    table = device_table(list_devices())
    header = [c.header for c in table.columns]
    rows = dict(zip(table.columns[0]._cells, table.columns[header.index("here")]._cells))
    assert rows["x86-avx512-vnni"] == "yes" and rows["rpi4"] == "-"
    assert rows["x86-amx"] == "no: lacks CPU flags avx512_bf16, amx_tile, amx_int8, amx_bf16"


def test_compile_refuses_a_spec_the_cpu_cannot_run_before_building(flags, tmp_path, capsys):
    from hago import zoo
    from hago.cli import main

    assets = zoo.export_mnist_demo(tmp_path / "assets", n_calib=16)
    flags(*CASCADE)
    cmd = ["compile", str(assets["model"]), "--device", "x86-amx", "--calib", str(assets["calib"])]
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hago: error: x86-amx (mcpu sapphirerapids) cannot run on this "
                                               "machine: it lacks CPU flags avx512_bf16, amx_tile, amx_int8, amx_bf16")
    assert not (tmp_path / "out").exists()
