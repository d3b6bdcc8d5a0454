"""Timing on this machine: the worker child, its time-out parent and the one Measurer protocol.

None of these build a model: fake workers and missing libraries stand in, so the failures a search
must survive (a crash, a bad library) are checked as data in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys

from hago.measure import LocalMeasurer, Measurement, RPCMeasurer, measure_local
from hago.measure.worker import measure as worker_measure

ENV_WORKER = """
import json, os, sys
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    print(json.dumps({"latency_ms": float(os.environ.get("TVM_NUM_THREADS", "0")), "std_ms": 0.0}), flush=True)
"""


def test_local_measurer_gives_its_worker_the_device_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    fake = tmp_path / "env_worker.py"
    fake.write_text(ENV_WORKER)
    lib = tmp_path / "x.so"
    lib.write_bytes(b"")
    m = LocalMeasurer(timeout_s=30, command=[sys.executable, str(fake)], threads=3)
    try:
        assert m.measure(lib, [([1], "float32")]).latency_ms == 3.0
    finally:
        m.close()


def test_a_worker_that_dies_is_a_failed_measurement_and_the_next_one_restarts_it(tmp_path):
    fake = tmp_path / "dying_worker.py"
    fake.write_text('import json, sys\nprint(json.dumps({"ready": True}), flush=True)\nsys.stdin.readline()\n'
                    'sys.exit(3)\n')
    m = LocalMeasurer(timeout_s=30, command=[sys.executable, str(fake)])
    try:
        for _ in range(2):
            got = m.measure(tmp_path / "x.so", [([1], "float32")])
            assert not got.ok and got.error == "measurement process died (exit 3)"
    finally:
        m.close()


def test_the_worker_reports_a_bad_library_as_one_line_of_data(tmp_path):
    bad = tmp_path / "not_a_library.so"
    bad.write_bytes(b"not an ELF file")
    reply = worker_measure({"lib": str(bad), "inputs": [[[1], "float32"]]})
    assert set(reply) == {"error"} and "\n" not in reply["error"] and reply["error"].split(":")[0].isidentifier()


def test_measure_local_returns_a_crash_as_data():
    m = measure_local(object(), [])
    assert isinstance(m, Measurement) and not m.ok and m.latency_ms is None and "\n" not in m.error


def test_every_measurer_has_the_protocol():
    for m in (LocalMeasurer(), RPCMeasurer("127.0.0.1:9190", "rpi4", check=False)):
        assert isinstance(m.name, str) and callable(m.measure)


def test_importing_the_package_loads_neither_tvm_nor_torch():
    """The CLI builds measurers before its heavy imports: nothing in hago.measure loads TVM at import."""
    code = ("import sys, hago.measure, hago.measure.qemu, hago.measure.worker; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'tvm', 'torch'})))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
