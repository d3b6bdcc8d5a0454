"""Per-kernel latencies, cached per (device, kernel workload), and estimates built from them.

Most candidates share most kernels: a conv that is integer in two strategies
runs the same kernel in both, and 4-bit weights ride in the same int8
containers as 8-bit ones. Each device measurement therefore also records how
long every kernel call took (the VM's instrument hook, in the measuring
process), keyed by the kernel's name and its argument shapes and dtypes, which
pins the workload, dtype and layout. A candidate whose kernels are all cached
gets an estimate, the sum of its calls, conversions included (a quantize or
dequantize at a float boundary is a kernel call like any other), without
touching the device.

The cache file carries a schema version and the device name; a different
version is ignored rather than misread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

SCHEMA = 1


def signature(symbol: str, args) -> str:
    """``name(shape:dtype, ...)`` of one kernel call; builder-added number suffixes are dropped."""
    base = symbol.rstrip("0123456789").rstrip("_")
    parts = []
    for a in args:
        shape = getattr(a, "shape", None)
        if shape is not None and hasattr(a, "dtype"):
            parts.append("x".join(str(int(d)) for d in shape) + ":" + str(a.dtype))
    return f"{base}({','.join(parts)})"


def profile_calls(vm, args, runs: int = 5) -> list[tuple[str, float]]:
    """Median milliseconds of every kernel call of one ``main`` run, in call order."""
    records: list[list] = []

    def instrument(func, symbol, before, ret, *call_args):
        if symbol.startswith("vm.builtin") or symbol.startswith("relax."):
            return 0
        if before:
            records.append([signature(symbol, call_args), time.perf_counter()])
        else:
            records[-1][1] = time.perf_counter() - records[-1][1]
        return 0

    vm.set_instrument(instrument)
    per_run = []
    try:
        for _ in range(runs):
            records.clear()
            vm["main"](*args)
            per_run.append([(s, t) for s, t in records])
    finally:
        vm.set_instrument(lambda *a: 0)
    sigs = [s for s, _ in per_run[0]]
    times = np.median(np.asarray([[t for _, t in run] for run in per_run]), axis=0) * 1e3
    return list(zip(sigs, times.tolist()))


class KernelCache:
    def __init__(self, path: str | Path, device: str):
        self.path, self.device = Path(path), device
        self.times: dict[str, float] = {}
        self.overheads: list[float] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("schema") == SCHEMA and data.get("device") == device:
                    self.times, self.overheads = data["kernels"], data.get("overheads", [])
            except (json.JSONDecodeError, KeyError):
                self.times, self.overheads = {}, []

    def add(self, calls: list[tuple[str, float]], total_ms: float | None = None) -> None:
        """Record the kernels of one measured run, and what the run cost beyond them.

        A kernel called several times in a run is stored at its mean, so the
        run's calls sum back to what was measured. The end-to-end time differs
        from that sum by the VM's own work (allocation, calls between kernels)
        and, the other way, by the instrument hook's cost on every call; the
        median difference corrects every estimate, and may be negative.
        """
        by_sig: dict[str, list[float]] = {}
        for sig, ms in calls:
            by_sig.setdefault(sig, []).append(ms)
        for sig, values in by_sig.items():
            self.times[sig] = float(np.mean(values))
        if total_ms is not None:
            self.overheads = (self.overheads + [total_ms - sum(ms for _, ms in calls)])[-50:]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA, "device": self.device, "kernels": self.times,
                                   "overheads": self.overheads}))
        tmp.replace(self.path)

    def estimate(self, signatures: list[str]) -> float | None:
        """Cached kernel times of one run, corrected to end-to-end time, or None if any kernel is unknown."""
        if not signatures or any(s not in self.times for s in signatures):
            return None
        correction = float(np.median(self.overheads)) if self.overheads else 0.0
        return max(float(sum(self.times[s] for s in signatures)) + correction, 0.0)
