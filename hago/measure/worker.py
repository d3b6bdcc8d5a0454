"""Child process that times exported builds, one JSON request per stdin line.

``python -m hago.measure.worker`` reads ``{"lib": path, "inputs": [[shape, dtype], ...],
"repeat": n, "min_repeat_ms": ms}`` lines and answers each with one JSON line,
``{"latency_ms", "std_ms"}`` or ``{"error"}``. Measuring in a child keeps a
crashing or hanging kernel from taking the search down: the parent waits
with a time-out, kills the child when it must, and records a failed
measurement. The child stays alive between requests so TVM is imported once.
The parent side is :class:`hago.measure.local.LocalMeasurer`.
"""

from __future__ import annotations

import json
import sys

from hago.errors import error_line


def measure(request: dict) -> dict:
    try:
        import numpy as np
        import tvm
        from tvm import relax

        dev = tvm.cpu()
        vm = relax.VirtualMachine(tvm.runtime.load_module(request["lib"]), dev)
        rng = np.random.default_rng(0)
        args = [tvm.runtime.tensor(rng.standard_normal(s).astype(d), dev) for s, d in request["inputs"]]
        vm["main"](*args)
        res = vm.time_evaluator("main", dev, number=1, repeat=request.get("repeat", 5),
                                min_repeat_ms=request.get("min_repeat_ms", 100))(*args)
        out = {"latency_ms": res.median * 1e3, "std_ms": float(np.std(res.results) * 1e3)}
        if request.get("profile"):
            from hago.search.kernelcache import profile_calls

            out["kernels"] = profile_calls(vm, args)
        return out
    except Exception as e:  # reported to the parent as data
        return {"error": error_line(e, with_type=True)}


def main() -> int:
    import tvm  # noqa: F401  (import once, before the first request)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(measure(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
