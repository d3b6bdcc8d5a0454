"""Which x86 specs this machine can run: the CPU flags each LLVM CPU name needs, against /proc/cpuinfo.

A build for a CPU the machine lacks dies with SIGILL at its first
unsupported instruction (``vpdpbusd`` on a Skylake, a tile load without
AMX), so hago refuses such a spec before building anything when the build
is to run here, and ``--device host`` picks the best spec this machine runs:
AMX, then VNNI + bf16, then VNNI, then AVX2 (:data:`HOST_PREFERENCE`).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl")
#: the /proc/cpuinfo flags a build for each LLVM CPU name executes (what hago's kernels use, not LLVM's whole list)
CPU_FLAGS = {
    "haswell": ("avx2", "fma"),
    "skylake-avx512": ("avx2", "fma", *_AVX512),
    "cascadelake": ("avx2", "fma", *_AVX512, "avx512_vnni"),
    "cooperlake": ("avx2", "fma", *_AVX512, "avx512_vnni", "avx512_bf16"),
    "icelake-server": ("avx2", "fma", *_AVX512, "avx512_vnni"),
    "sapphirerapids": ("avx2", "fma", *_AVX512, "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"),
    "emeraldrapids": ("avx2", "fma", *_AVX512, "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"),
    "graniterapids": ("avx2", "fma", *_AVX512, "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"),
    "graniterapids-d": ("avx2", "fma", *_AVX512, "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"),
    "diamondrapids": ("avx2", "fma", *_AVX512, "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"),
    "znver4": ("avx2", "fma", *_AVX512, "avx512_vnni", "avx512_bf16"),
    "znver5": ("avx2", "fma", *_AVX512, "avx512_vnni", "avx512_bf16"),
}
#: LLVM ``mattr`` features -> the /proc/cpuinfo flag that has them
MATTR_FLAGS = {"+avx2": "avx2", "+fma": "fma", "+avx512f": "avx512f", "+avx512vnni": "avx512_vnni",
               "+avx512bf16": "avx512_bf16", "+amx-tile": "amx_tile", "+amx-int8": "amx_int8",
               "+amx-bf16": "amx_bf16"}
#: best first: the spec ``--device host`` picks is the first this machine runs
HOST_PREFERENCE = ("x86-amx", "x86-avx512-bf16", "x86-avx512-vnni", "x86-avx2")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (empty where /proc/cpuinfo is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def is_x86_host() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def required_flags(target: dict) -> tuple[str, ...]:
    """The CPU flags a build for spec target ``target`` runs; an unknown CPU name needs none we know of."""
    flags = list(CPU_FLAGS.get(str(target.get("mcpu", "")), ()))
    flags += [MATTR_FLAGS[a] for a in (target.get("mattr") or []) if a in MATTR_FLAGS]
    return tuple(dict.fromkeys(flags))


def target_problem(target: dict, flag: str, what: str) -> tuple[str, str] | None:
    """``("inputs", problem)`` when spec target ``target`` (named CPU or ``mattr``) lacks ``flag``, for ``what``."""
    if flag in required_flags(target):
        return None
    cpus = ", ".join(sorted(cpu for cpu, flags in CPU_FLAGS.items() if flag in flags))
    return "inputs", f"target mcpu {target.get('mcpu')!r} has no {flag}; {what} needs one of {cpus} or its mattr"


def host_problem(target: dict) -> str | None:
    """Why this machine cannot run a build for ``target`` (the missing CPU flags); None if it can."""
    if not is_x86_host():
        return f"not x86-64 but {platform.machine()}"
    have = cpu_flags()
    if not have:
        return None  # no /proc/cpuinfo: nothing to check against
    missing = [f for f in required_flags(target) if f not in have]
    return f"lacks CPU flags {', '.join(missing)}" if missing else None
