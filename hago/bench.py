"""``hago bench``: fp32, plain int8 and a searched strategy side by side on one device."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .hwspec import HardwareSpec
from .weight_bytes import format_bytes


def bench(model, device, calib, eval_data, strategies: list[str], out_dir=None, engine_options=None,
          algorithm: str = "evolve", console: Console | None = None) -> list[dict]:
    from .compiler import compile as hago_compile
    from .search.run import search

    console = console or Console()
    out = Path(out_dir) if out_dir else None
    unknown = set(strategies) - {"fp32", "int8", "bf16", "search"}
    if unknown:
        from .search.target import SearchError

        raise SearchError(f"unknown strategies {sorted(unknown)}; valid: fp32, int8, bf16, search")
    rows = []
    if {"fp32", "int8"} & set(strategies):
        r = hago_compile(model, device, calib, eval_data=eval_data, out_dir=out / "int8" if out else None)
        if "fp32" in strategies:
            rows.append({"strategy": "fp32", **r.report["fp32"]})
        if "int8" in strategies:
            rows.append({"strategy": "int8 (all integer)", **r.report["quantized"]})
    if "bf16" in strategies:
        from .annotate import AnnotateConfig

        r = hago_compile(model, device, calib, eval_data=eval_data, out_dir=out / "bf16" if out else None,
                         annotate_config=AnnotateConfig(all_bf16=True), corrections=[])
        rows.append({"strategy": "bf16 (bf16 where it can be, fp32 elsewhere)", **r.report["quantized"]})
    if "search" in strategies:
        res = search(model, device, calib, eval_data, out_dir=out / "search" if out else None,
                     algorithm=algorithm, log_path=(out / "search" / "search.jsonl") if out else None,
                     **(engine_options or {}))
        if res.best is not None:
            rows.append({"strategy": f"search ({res.best.label})", "latency_ms": res.best.latency_ms,
                         "accuracy": res.best.accuracy, "weight_bytes": res.best.weight_bytes})
        else:  # e.g. nothing fits --max-weight-bytes: say why the row is missing
            console.print(f"search: {res.message}")
    spec = device if isinstance(device, HardwareSpec) else HardwareSpec.load(device)
    t = Table(title=f"hago bench: {device if isinstance(device, str) else spec.name}")
    for col in ("strategy", "latency ms" + (" (modelled)" if spec.latency == "modelled" else ""), "accuracy",
                "weights", "vs fp32"):
        t.add_column(col)
    base = next((r["latency_ms"] for r in rows if r["strategy"] == "fp32"), None)
    for r in rows:
        lat = r.get("latency_ms")
        t.add_row(r["strategy"], "-" if lat is None else f"{lat:.3f}",
                  "-" if r.get("accuracy") is None else f"{r['accuracy']:.4f}", format_bytes(r.get("weight_bytes")),
                  f"{base / lat:.2f}x" if base and lat else "-")
    console.print(t)
    return rows
