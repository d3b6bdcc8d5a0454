"""report: the terminal summary of a compile, from ``report.json``'s dict.

Kept apart from the pipeline so the CLI, the demo and (later) the search all
print the same table, and so library code never prints.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .weight_bytes import format_bytes


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_table(report: dict) -> Table:
    """FP32 against quantized: latency, accuracy, weight bytes (packed 4-bit weights count half), and what
    stayed in float."""
    t = Table(title=f"hago: {report['device']}  (calibrator {report.get('calibrator')})")
    t.add_column("build")
    t.add_column(f"latency ms (batch {report.get('batch', 1)}{latency_label(report, ', ')})", justify="right")
    t.add_column("top-1", justify="right")
    t.add_column("weights", justify="right")
    bf16 = report["ops"].get("bf16", 0)
    t.add_column("ops integer/bf16/float" if bf16 else "ops integer/float", justify="right")
    fp, q = report["fp32"], report["quantized"]
    t.add_row("FP32", _fmt(fp.get("latency_ms"), ".3f"), _fmt(fp.get("accuracy"), ".2%"),
              format_bytes(fp.get("weight_bytes")), "-")
    ops = "/".join(str(report["ops"][k]) for k in (("integer", "bf16", "float") if bf16 else ("integer", "float")))
    latency = _fmt(q.get("latency_ms"), ".3f")
    if slower_than_fp32(report):
        latency = f"[bold red]{latency} SLOWER[/]"
    weights = format_bytes(q.get("weight_bytes"))
    if fp.get("weight_bytes") and q.get("weight_bytes"):
        weights += f" ({q['weight_bytes'] / fp['weight_bytes']:.2f}x)"
    t.add_row("quantized", latency, _fmt(q.get("accuracy"), ".2%"), weights, ops)
    return t


def latency_label(report: dict, sep: str = " ") -> str:
    """``sep + "modelled"`` for a spec whose latency is modelled (a simulated device), else ''."""
    return f"{sep}modelled" if report.get("latency") == "modelled" else ""


def slower_than_fp32(report: dict) -> bool:
    """Whether the quantized build measured slower than the FP32 build beside it (never for modelled latency:
    a simulated device's times are this machine's, so they do not rank the builds)."""
    if report.get("latency") == "modelled":
        return False
    f, q = report["fp32"].get("latency_ms"), report["quantized"].get("latency_ms")
    return bool(f and q and q > f)


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(report))
    if report.get("speedup"):
        threads = f" ({report['threads']} threads)" if report.get("threads") else ""
        console.print(f"speed-up over FP32 (hago's FP32 build, blocked float kernels{latency_label(report, ', ')}): "
                      f"{report['speedup']:.2f}x{threads}")
    if report.get("agreement") is not None:
        console.print(f"top-1 agreement with FP32: {report['agreement']:.2%} on {report.get('eval_samples')} samples")
    for op in report.get("float_ops", []):
        console.print(f"[yellow]float[/]: {op['name']} ({op['kind']}): {op['reason']}")
    if latency_label(report):
        console.print(f"[bold yellow]note[/]: {report['device']}'s latency is modelled: the device is simulated "
                      f"on this machine, so these times are this machine's, not the device's")
    for note in report.get("notes", []):
        console.print(f"[bold yellow]note[/]: {note}")
    if slower_than_fp32(report):  # the last line a user reads: never let a slower build pass quietly
        console.print(f"[bold red]warning[/]: the quantized build is {1 / report['speedup']:.2f}x slower than "
                      f"FP32 on {report['device']}; FP32 (or another strategy: hago search) is the faster build")
