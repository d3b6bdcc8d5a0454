"""The front of measured candidates (latency, accuracy and weight bytes): terminal table and plot."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..weight_bytes import format_bytes


def _dominates(a, b, sized: bool) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one (bytes when ``sized``)."""
    objectives = [(a.latency_ms, b.latency_ms), (-a.accuracy, -b.accuracy)]
    if sized:
        objectives.append((a.weight_bytes, b.weight_bytes))
    return all(x <= y for x, y in objectives) and any(x < y for x, y in objectives)


def front(cands: list, max_weight_bytes: int | None = None) -> list:
    """Non-dominated measured candidates, fastest first: lower latency, higher accuracy and, where every
    candidate's weight bytes are known, fewer bytes (a smaller build that is slower is on the front too;
    an older log without sizes gives the latency/accuracy front).

    With ``max_weight_bytes``, only candidates within that budget (the ones that may be chosen).
    """
    ok = [c for c in cands if c.latency_ms is not None and c.accuracy is not None]
    if max_weight_bytes is not None:
        ok = [c for c in ok if c.weight_bytes is not None and c.weight_bytes <= max_weight_bytes]
    sized = all(c.weight_bytes is not None for c in ok)
    out = [c for c in ok if not any(_dominates(o, c, sized) for o in ok if o is not c)]
    return sorted(out, key=lambda c: (c.latency_ms, -c.accuracy, c.weight_bytes or 0))


def table(cands: list, chosen, threshold: float, metric: str, latency: str = "measured",
          max_weight_bytes: int | None = None) -> Table:
    """``latency``: the spec's, ``modelled`` for a simulated device (the column says so)."""
    budget = f", weights <= {format_bytes(max_weight_bytes)}" if max_weight_bytes is not None else ""
    t = Table(title=f"Pareto front ({metric}; target >= {threshold:.4f}{budget})")
    lat_col = "latency ms" if latency != "modelled" else "latency ms (modelled)"
    for col in ("", lat_col, metric, "weights", "meets", "strategy"):
        t.add_column(col, justify="right" if col in (lat_col, metric, "weights") else "left")
    for c in cands:
        mark = "*" if chosen is not None and c.key == chosen.key else ""
        t.add_row(mark, f"{c.latency_ms:.3f}", f"{c.accuracy:.4f}", format_bytes(c.weight_bytes),
                  "yes" if c.accuracy >= threshold else "no", c.label)
    return t


def plot(cands: list, pareto: list, chosen, threshold: float, path: Path, metric: str, fp32=None,
         latency: str = "measured") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [c for c in cands if c.latency_ms is not None]
    ax.scatter([c.latency_ms for c in pts], [c.accuracy for c in pts], s=14, c="0.6", label=latency)
    ax.plot([c.latency_ms for c in pareto], [c.accuracy for c in pareto], "o", ms=4, label="Pareto front")
    for c in pareto:  # the front is three-dimensional: each point says its size
        if c.weight_bytes is not None:
            ax.annotate(format_bytes(c.weight_bytes), (c.latency_ms, c.accuracy), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
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
