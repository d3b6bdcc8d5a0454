"""Run a cross-compiled aarch64 ``model.so`` under ``qemu-aarch64`` on this machine.

No Raspberry Pi is attached here, but Debian's user-mode qemu runs aarch64
Linux binaries directly. The TVM Python package cannot run under it (its
wheel is x86), so a small C++ driver (``tools/run_vm.cc``, cross-built by
``tools/install_arm.sh`` as ``hago_run_vm``) loads the library with the
aarch64 ``libtvm_runtime.so``/``libtvm_ffi.so`` from the aarch64 wheels and
runs ``main``. Tensors cross the process boundary as an "HGT1" file: per
tensor a DLDataType, the shape and the raw bytes (see the driver's header).

This checks that the ARM build is *correct* (bit-exact against the host); qemu
timings say nothing about a Pi, so latency comes from a board over RPC
(:mod:`hago.measure.rpc`) and there is no qemu :class:`~hago.measure.Measurer`.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import MeasureError, error_line

log = logging.getLogger(__name__)

QEMU = "qemu-aarch64"
GUEST_LIBC = Path("/usr/aarch64-linux-gnu")  # Debian's libc6-arm64-cross: qemu's -L prefix
INSTALL_HINT = "run `make install` or tools/install_arm.sh"
_MAGIC = b"HGT1"
# numpy kind -> DLPack type code (kDLInt, kDLUInt, kDLFloat, kDLBool)
_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}
_KINDS = {v: k for k, v in _CODES.items()}


def sysroot() -> Path:
    """Where install_arm.sh put ``lib/`` and ``bin/``: ``$HAGO_ARM_SYSROOT`` or ``.hago_cache/aarch64``."""
    env = os.environ.get("HAGO_ARM_SYSROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".hago_cache" / "aarch64"


def driver_path() -> Path:
    return sysroot() / "bin" / "hago_run_vm"


def is_available() -> tuple[bool, str]:
    """``(True, "")`` if qemu, the aarch64 libc and the runtime/driver are here, else ``(False, what is missing)``."""
    root = sysroot()
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (apt qemu-user)")
    if not (GUEST_LIBC / "lib" / "ld-linux-aarch64.so.1").exists():
        missing.append(f"{GUEST_LIBC} (apt libc6-dev-arm64-cross)")
    for lib in ("libtvm_runtime.so", "libtvm_ffi.so"):
        if not (root / "lib" / lib).is_file():
            missing.append(f"{root / 'lib' / lib}")
    if not os.access(driver_path(), os.X_OK):
        missing.append(str(driver_path()))
    if missing:
        return False, f"missing {', '.join(missing)}: {INSTALL_HINT}"
    return True, ""


def save_tensors(path: str | Path, arrays: list[np.ndarray]) -> None:
    """Write ``arrays`` as an HGT1 file (the driver's input format)."""
    with open(path, "wb") as f:
        f.write(_MAGIC + struct.pack("<I", len(arrays)))
        for a in arrays:
            a = np.asarray(a)  # not ascontiguousarray: it turns a 0-d array into shape (1,)
            if a.dtype.kind not in _CODES:
                raise MeasureError(f"cannot pass a {a.dtype} tensor to the aarch64 driver (int, uint, float, bool only)")
            bits = 8 if a.dtype.kind == "b" else a.dtype.itemsize * 8
            f.write(struct.pack("<BBHI", _CODES[a.dtype.kind], bits, 1, a.ndim))
            f.write(struct.pack(f"<{a.ndim}q", *a.shape))
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))


def load_tensors(path: str | Path) -> list[np.ndarray]:
    """Read an HGT1 file (the driver's output) into numpy arrays."""
    buf = Path(path).read_bytes()
    if buf[:4] != _MAGIC:
        raise MeasureError(f"{path} is not an HGT1 tensor file")
    (count,), pos, out = struct.unpack_from("<I", buf, 4), 8, []
    for _ in range(count):
        code, bits, lanes, ndim = struct.unpack_from("<BBHI", buf, pos)
        pos += 8
        shape = struct.unpack_from(f"<{ndim}q", buf, pos)
        pos += 8 * ndim
        if code not in _KINDS or lanes != 1:
            raise MeasureError(f"the aarch64 driver returned an unsupported dtype (code {code}, lanes {lanes})")
        dtype = np.dtype(bool) if code == 6 else np.dtype(f"<{_KINDS[code]}{bits // 8}")
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out.append(np.frombuffer(buf, dtype, n // dtype.itemsize, pos).reshape(shape).copy())
        pos += n
    return out


def run_under_qemu(lib_path: str | Path, inputs: list[np.ndarray], *, timeout: float = 600.0,
                   cpu: str | None = None, threads: int | None = None) -> list[np.ndarray]:
    """Run ``main`` of the aarch64 VM library ``lib_path`` on ``inputs`` under qemu.

    Parameters
    ----------
    lib_path : path
        A ``model.so`` exported with the aarch64 cross compiler.
    inputs : list of np.ndarray
        One array per ``main`` parameter, in order.
    timeout : float
        Seconds before the run is killed (qemu is 10-50x slower than native).
    cpu : str, optional
        qemu's ``-cpu`` model, e.g. the spec's ``cortex-a72``: an instruction the
        board lacks (``sdot`` on a Pi 4) then traps as it would on the board.
        Default: qemu's ``max``, which has every extension.
    threads : int, optional
        ``TVM_NUM_THREADS`` for the guest; TVM's default is this machine's cores.

    Returns the outputs of ``main`` (a tuple is flattened), as numpy arrays.
    Raises a one-line :class:`~hago.errors.MeasureError` when qemu, the
    toolchain or the runtime is missing, or the run fails or times out.
    """
    ok, why = is_available()
    if not ok:
        raise MeasureError(f"cannot run aarch64 code under qemu: {why}")
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise MeasureError(f"no library at {lib_path}: build it for an ARM spec first")
    guest_env = ["-cpu", cpu] if cpu else []
    guest_env += ["-E", f"LD_LIBRARY_PATH={sysroot() / 'lib'}"]
    if threads:
        guest_env += ["-E", f"TVM_NUM_THREADS={int(threads)}"]
    with tempfile.TemporaryDirectory(prefix="hago_qemu_") as tmp:
        src, dst = Path(tmp) / "in.hgt", Path(tmp) / "out.hgt"
        save_tensors(src, inputs)
        cmd = [QEMU, "-L", str(GUEST_LIBC), *guest_env, str(driver_path()), str(lib_path.resolve()), str(src), str(dst)]
        log.debug("running %s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"{lib_path.name} under qemu did not finish in {timeout:g}s; "
                               "pass fewer inputs or a longer timeout") from None
        if proc.returncode < 0:
            sig = -proc.returncode
            hint = f": an instruction the {cpu or 'emulated CPU'} lacks" if sig == 4 else ""
            raise MeasureError(f"{lib_path.name} was killed by signal {sig} under qemu{hint}")
        if proc.returncode != 0:
            detail = error_line(proc.stderr or proc.stdout, limit=300) or f"exit status {proc.returncode}"
            raise MeasureError(f"{lib_path.name} failed under qemu: {detail}")
        return load_tensors(dst)
