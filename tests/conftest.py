"""Shared session fixtures: the real pretrained MNIST CNN, the real MNIST test set, TVM helpers.

Everything heavy (unpickling MNIST, exporting ONNX, torch reference logits)
happens once per session; tests must not mutate what these return.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import pytest

from hago import zoo

# Tuning records and kernel latencies go to a fresh folder: tests never read a user's ~/.cache.
os.environ["HAGO_CACHE_DIR"] = tempfile.mkdtemp(prefix="hago_test_cache_")

# ``make test`` runs two workers on the two cores: one thread each. TVM's thread pool spins while it waits for
# work, so two 2-thread pools (and BLAS's, torch's) on two cores spend much of the suite spinning against each
# other. Set before anything starts a pool; a test about threads sets its own, and a value the caller set wins.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    for _var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

# Compile for a CPU with avx512 + VNNI: a bare {"kind": "llvm"} turns every AVX feature off.
CPU_TARGET = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}
# The default (untuned) pipeline is naive, so numeric checks use this many images.
N_CHECK = 1000
BATCH = 250


@pytest.fixture(scope="session")
def mnist_model():
    """The ccexam MNIST CNN as an eval-mode ``nn.Sequential`` (99.05% FP32)."""
    return zoo.mnist_cnn()


@pytest.fixture(scope="session")
def mnist_test():
    """``(x, y)``: float32 [10000, 1, 28, 28] normalised images, int64 [10000] labels."""
    return zoo.mnist_data("test")


@pytest.fixture(scope="session")
def mnist_onnx_path(tmp_path_factory):
    """The MNIST CNN exported once to ONNX (input ``input``, dynamic batch ``N``)."""
    return zoo.export_mnist_onnx(tmp_path_factory.mktemp("mnist_onnx") / "mnist_cnn.onnx")


@pytest.fixture(scope="session")
def mnist_ref(mnist_model, mnist_test):
    """``(x, logits)``: the first ``N_CHECK`` test images and torch's FP32 logits for them."""
    import torch

    x = mnist_test[0][:N_CHECK]
    with torch.no_grad():
        logits = mnist_model(torch.from_numpy(x)).numpy()
    return x, logits


@pytest.fixture(scope="session")
def cpu_target():
    import tvm

    return tvm.target.Target(CPU_TARGET)


@pytest.fixture(scope="session")
def run_tvm(cpu_target):
    """``run(mod, x, batch=BATCH) -> np.ndarray``: compile ``mod`` and run ``main`` over ``x`` in batches."""
    import tvm
    from tvm import relax

    def run(mod, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
        vm = relax.VirtualMachine(tvm.compile(mod, target=cpu_target), tvm.cpu())
        outs = [vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[i:i + batch]))).numpy()
                for i in range(0, len(x), batch)]
        return np.concatenate(outs)

    return run


@contextlib.contextmanager
def local_rpc(key: str, port: int = 9500, boards=None):
    """``"127.0.0.1:PORT"`` of a tracker with RPC servers (this CPU) registered with it.

    ``boards``: ``[(key, init_callback or None), ...]``, one server each (TVM's
    ``server_init_callback`` registers functions in it); default one plain
    server under ``key``. Everything binds to 127.0.0.1 only and is
    terminated on exit. The tracker takes a port in ``[port, port + 100)``, the
    servers in ``[port + 200, port + 300)``: callers keep their ranges apart
    (9190, 9500, 10000, 10400), since test files run side by side.
    """
    import time
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    boards = boards or [(key, None)]
    trk = Tracker(host="127.0.0.1", port=port, port_end=port + 100, silent=True)
    servers = []
    try:
        def start(board):  # each server process imports TVM first: start them side by side
            board_key, init = board
            return rpc.Server(host="127.0.0.1", port=port + 200, port_end=port + 300, key=board_key,
                              tracker_addr=("127.0.0.1", trk.port), silent=True, server_init_callback=init)

        with ThreadPoolExecutor(max_workers=len(boards)) as pool:
            servers.extend(pool.map(start, boards))
        # each server imports TVM before it registers: six at once on two cores that a parallel test worker
        # also loads took long enough once (session 15) to fail a 90 s deadline, with no record of the state
        start = time.monotonic()
        want = Counter(k for k, _ in boards)
        while True:
            tc = rpc.connect_tracker("127.0.0.1", trk.port)
            queue = tc.summary()["queue_info"]
            tc.close()
            if all(queue.get(k, {}).get("free", 0) >= n for k, n in want.items()):
                break
            waited = time.monotonic() - start
            assert waited < 240, (f"the local RPC servers did not all register with the tracker in {waited:.0f} s: "
                                  f"wanted {dict(want)} free, the tracker's queue holds {queue}")
            time.sleep(0.3)
        yield f"127.0.0.1:{trk.port}"
    finally:
        for server in servers:
            server.terminate()
        trk.terminate()


@pytest.fixture(scope="session")
def rpc_tracker():
    """``(tracker, key)`` of a local board (this CPU) for the search tests."""
    with local_rpc("local-board", port=9500) as tracker:
        yield tracker, "local-board"
