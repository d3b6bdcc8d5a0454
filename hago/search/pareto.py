"""The latency/accuracy front of measured candidates: terminal table and plot."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def front(cands: list) -> list:
    """Non-dominated candidates (lower latency, higher accuracy), fastest first."""
    ok = sorted((c for c in cands if c.latency_ms is not None), key=lambda c: (c.latency_ms, -c.accuracy))
    out, best_acc = [], -1.0
    for c in ok:
        if c.accuracy > best_acc:
            out.append(c)
            best_acc = c.accuracy
    return out


def table(cands: list, chosen, threshold: float, metric: str, latency: str = "measured") -> Table:
    """``latency``: the spec's, ``modelled`` for a simulated device (the column says so)."""
    t = Table(title=f"Pareto front ({metric}; target >= {threshold:.4f})")
    lat_col = "latency ms" if latency != "modelled" else "latency ms (modelled)"
    for col in ("", lat_col, metric, "meets", "strategy"):
        t.add_column(col, justify="right" if col in (lat_col, metric) else "left")
    for c in cands:
        mark = "*" if chosen is not None and c.key == chosen.key else ""
        t.add_row(mark, f"{c.latency_ms:.3f}", f"{c.accuracy:.4f}", "yes" if c.accuracy >= threshold else "no",
                  c.label)
    return t


def plot(cands: list, pareto: list, chosen, threshold: float, path: Path, metric: str, fp32=None,
         latency: str = "measured") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [c for c in cands if c.latency_ms is not None]
    ax.scatter([c.latency_ms for c in pts], [c.accuracy for c in pts], s=14, c="0.6", label=latency)
    ax.plot([c.latency_ms for c in pareto], [c.accuracy for c in pareto], "-o", ms=4, label="Pareto front")
    ax.axhline(threshold, ls="--", c="r", lw=1, label="accuracy target")
    if fp32 is not None and fp32.latency_ms is not None:
        ax.scatter([fp32.latency_ms], [fp32.accuracy], marker="s", s=40, c="k", label="FP32")
    if chosen is not None and chosen.latency_ms is not None:
        ax.scatter([chosen.latency_ms], [chosen.accuracy], marker="*", s=180, c="gold", edgecolors="k",
                   label="chosen", zorder=5)
    ax.set_xlabel("latency (ms, batch 1, modelled)" if latency == "modelled" else "latency (ms, batch 1)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
