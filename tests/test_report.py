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


def test_weight_bytes_column():
    """The weight bytes of both builds (``hago.weight_bytes``), and the quantized build's share of FP32's."""
    r = _report(2.0, 1.0)
    r["fp32"]["weight_bytes"], r["quantized"]["weight_bytes"] = 4_000_000, 520_000
    lines = _render(r)
    assert "4.00 MB" in next(l for l in lines if "FP32" in l)  # the first FP32 line is the table's row
    assert "520.00 kB (0.13x)" in next(l for l in lines if "quantized" in l)


def test_weight_bytes_counts_weights_once_and_skips_biases():
    import numpy as np
    from tvm import relax

    from hago.weight_bytes import is_weight, weight_bytes

    assert is_weight((3, 5)) and is_weight((2, 1, 16, 4)) and not is_weight((1, 64, 1, 1)) and not is_weight((7,))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    w = relax.const(np.ones((3, 5), np.float32))
    with bb.function("main", [x]):
        y = bb.emit(relax.op.add(relax.op.matmul(x, w), relax.const(np.ones((1, 5), np.float32))))
        y = bb.emit(relax.op.matmul(y, relax.op.astype(relax.const(np.ones((5, 4), np.int8)), "float32")))
        bb.emit_func_output(relax.op.add(y, relax.op.sum(relax.op.matmul(x, w))))
    assert weight_bytes(bb.get()) == 3 * 5 * 4 + 5 * 4  # w once, the int8 weight, no bias
