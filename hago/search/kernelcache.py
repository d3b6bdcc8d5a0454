"""Per-kernel latencies, cached per (device, kernel workload), and estimates built from them.

Most candidates share most kernels: a conv that is integer in two strategies
runs the same kernel in both, and 4-bit weights ride in the same int8
containers as 8-bit ones, except where a backend has a packed 4-bit kernel
(x86 VNNI: a dense, :mod:`hago.backends.x86.vnni_int4`, and a conv with more
than 4 input channels, :mod:`hago.backends.x86.vnni_conv_int4`). Each device measurement
therefore also records how long every kernel call took (the VM's instrument
hook, in the measuring process), keyed by the kernel's name and its argument
shapes and dtypes, which pins the workload, dtype and layout. A candidate
whose kernels are all cached gets an estimate, the sum of its calls,
conversions included (a quantize or dequantize at a float boundary is a
kernel call like any other), without touching the device.

The builder numbers the functions it fuses (``fused_conv2d1_add3_relu``);
the numbers are dropped from every ``_``-separated part of the name, so the
same workload fused in another build shares its entry.

End-to-end time differs from the sum of a run's calls by the VM's own work
and the instrument hook's cost; each measured run keeps that difference, and
an estimate takes it from the cached run whose calls overlap the candidate's
most (for a candidate that runs exactly a measured run's calls, the estimate
is that measurement).

The cache file carries a schema version and the device name; a different
version is ignored rather than misread.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

SCHEMA = 2
MAX_RUNS = 64


def signature(symbol: str, args) -> str:
    """``name(shape:dtype, ...)`` of one kernel call; builder-added number suffixes are dropped."""
    base = "_".join(part.rstrip("0123456789") or part for part in symbol.split("_")).rstrip("_")
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
        self.runs: list[dict] = []  # {"calls": [signature, ...], "overhead": ms} of measured runs
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("schema") == SCHEMA and data.get("device") == device:
                    self.times, self.runs = data["kernels"], data.get("runs", [])
            except (json.JSONDecodeError, KeyError):
                self.times, self.runs = {}, []

    @property
    def overheads(self) -> list[float]:
        return [r["overhead"] for r in self.runs]

    def add(self, calls: list[tuple[str, float]], total_ms: float | None = None) -> None:
        """Record the kernels of one measured run, and what the run cost beyond them.

        A kernel called several times in a run is stored at its mean, so the
        run's calls sum back to what was measured. The end-to-end time differs
        from that sum by the VM's own work (allocation, calls between kernels)
        and, the other way, by the instrument hook's cost on every call; the
        difference (which may be negative) is kept with the run's calls.
        """
        by_sig: dict[str, list[float]] = {}
        for sig, ms in calls:
            by_sig.setdefault(sig, []).append(ms)
        for sig, values in by_sig.items():
            self.times[sig] = float(np.mean(values))
        if total_ms is not None:
            sigs = [sig for sig, _ in calls]
            self.runs = [r for r in self.runs if r["calls"] != sigs]
            self.runs = (self.runs + [{"calls": sigs, "overhead": total_ms - sum(ms for _, ms in calls)}])[-MAX_RUNS:]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA, "device": self.device, "kernels": self.times,
                                   "runs": self.runs}))
        tmp.replace(self.path)

    def estimate(self, signatures: list[str]) -> float | None:
        """Cached kernel times of one run, corrected to end-to-end time, or None if any kernel is unknown."""
        if not signatures or any(s not in self.times for s in signatures):
            return None
        return max(float(sum(self.times[s] for s in signatures)) + self.correction(signatures), 0.0)

    def estimate_partial(self, signatures: list[str]) -> float | None:
        """Like :meth:`estimate`, with every unknown kernel priced like a known one of its kind: the
        same op family (the heavy op its name starts with) and argument shapes, dtypes aside, else
        the median known kernel of that family, else the median known kernel that is no conv/matmul."""
        if not signatures or not self.times:
            return None
        if all(s in self.times for s in signatures):
            return self.estimate(signatures)
        total = 0.0
        for sig in signatures:
            total += self.times[sig] if sig in self.times else self._like(sig)
        return max(total + self.correction(signatures), 0.0)

    @staticmethod
    def _family(sig: str) -> str:
        name = sig.split("(")[0]
        for heavy in ("vnni", "conv2d", "matmul", "dense", "pool"):
            if heavy in name:
                return heavy
        return "other"

    @staticmethod
    def _shapes(sig: str) -> tuple:
        args = sig[sig.index("(") + 1:-1].split(",") if "(" in sig else []
        return tuple(a.split(":")[0] for a in args)

    def _like(self, sig: str) -> float:
        fam, shapes = self._family(sig), self._shapes(sig)
        same = [t for s, t in self.times.items() if self._family(s) == fam and self._shapes(s)[:2] == shapes[:2]]
        if same:
            return float(np.median(same))
        pool = [t for s, t in self.times.items() if self._family(s) == fam] or \
               [t for s, t in self.times.items() if self._family(s) in ("other", "pool")] or list(self.times.values())
        return float(np.median(pool))

    def correction(self, signatures: list[str]) -> float:
        """The overhead of the measured run most like ``signatures`` (shared calls over all calls)."""
        if not self.runs:
            return 0.0
        want = Counter(signatures)

        def overlap(run):
            have = Counter(run["calls"])
            return sum((want & have).values()) / max(sum((want | have).values()), 1)

        return float(max(reversed(self.runs), key=overlap)["overhead"])
