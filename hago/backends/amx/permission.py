"""The Linux permission to use AMX tile state, and whether this host can run AMX at all.

Linux (5.16+) keeps the 8 KiB of AMX tile data out of a process's signal
frames and context switches until the process asks for it with
``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``. A process that runs
a tile instruction without it gets SIGILL. The permission is process-wide
(every thread, including ones started before the request) and cannot be
given back, so asking twice is harmless; the second time costs one syscall,
and ``request_amx`` remembers a success so it costs nothing after that.

The kernels of this package also ask for it themselves (see ``amx_ir``:
the first call of a kernel makes the same syscall), so a deployed library
works in a process that never imported hago. This module is for hago's own
runners and for the tests, which must not run a kernel on a host that
cannot (``amx_available``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from pathlib import Path

SYS_ARCH_PRCTL = 158  # x86-64 syscall number
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
#: /proc/cpuinfo flags the kernels need: tile registers, tdpbusd, tdpbf16ps
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")

_lock = threading.Lock()
_granted = False
_last_error: str | None = None


def _is_x86_64_linux() -> bool:
    return platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


def request_amx() -> bool:
    """Ask Linux for AMX tile state for this process; True when granted (now or earlier).

    False off x86-64 Linux, on a CPU without AMX, or on a kernel that does
    not know the request (before 5.16): the reason is in ``amx_available()``.
    """
    global _granted, _last_error
    if _granted:
        return True
    if not _is_x86_64_linux():
        _last_error = f"AMX needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
        return False
    with _lock:
        if _granted:
            return True
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        rc = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_REQ_XCOMP_PERM),
                          ctypes.c_long(XFEATURE_XTILEDATA))
        if rc == 0:
            _granted, _last_error = True, None
        else:
            err = ctypes.get_errno()
            _last_error = (f"arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed: "
                           f"{os.strerror(err) if err else 'error'} (errno {err})")
    return _granted


def missing_cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The AMX flags (``AMX_FLAGS``) absent from /proc/cpuinfo's first ``flags`` line (all of them if unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return list(AMX_FLAGS)
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return [f for f in AMX_FLAGS if f not in flags]


def amx_available() -> str | None:
    """None when this process can run the AMX kernels (and now has the permission), else a one-line reason."""
    if not _is_x86_64_linux():
        return f"AMX needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
    missing = missing_cpu_flags()
    if missing:
        return f"CPU lacks {', '.join(missing)} (/proc/cpuinfo)"
    if not request_amx():
        return _last_error or "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed"
    return None
