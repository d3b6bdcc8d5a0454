"""The terminal summary flags a quantized build that is slower than FP32 in the table and in its last line."""

from __future__ import annotations

from rich.console import Console

from hago.report import print_report, slower_than_fp32


def _report(fp32_ms, q_ms):
    r = {"device": "x86-avx512-vnni", "calibrator": "mse", "batch": 4, "fp32": {"latency_ms": fp32_ms},
         "quantized": {"latency_ms": q_ms}, "ops": {"integer": 3, "float": 2}, "float_ops": [], "notes": []}
    if fp32_ms and q_ms:
        r["speedup"] = fp32_ms / q_ms
    return r


def _render(report) -> list[str]:
    console = Console(record=True, width=200)
    print_report(report, console)
    return console.export_text().splitlines()


def test_slower_build_is_flagged_in_the_table_and_the_last_line():
    lines = _render(_report(1.0, 2.5))
    row = next(l for l in lines if "quantized" in l)
    assert "2.500 SLOWER" in row
    assert lines[-1].startswith("warning: the quantized build is 2.50x slower than FP32 on x86-avx512-vnni")
    assert any("batch 4" in l for l in lines)


def test_faster_or_unmeasured_builds_are_not_flagged():
    for fp, q in ((2.5, 1.0), (None, 1.0), (1.0, None)):
        assert not slower_than_fp32(_report(fp, q))
        assert not any("SLOWER" in l or l.startswith("warning") for l in _render(_report(fp, q)))
