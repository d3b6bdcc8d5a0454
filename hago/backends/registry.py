"""The backend registry: a name per backend, and which backend a spec or a target gets.

A spec names its backend (``backend: x86``) or the registry derives it:
the first registered backend of the spec's target kind that lists one of the
spec's ``intrinsics`` (``x86-vnni``, ``arm-sdot``, ``dp4a_s8s8s32`` ...),
else the generic backend of that kind (a plain LLVM CPU, or CUDA). The
built-in backends are registered here (one line each); anything else, a test
or a plug-in, calls :func:`register_backend` at run time and is found the
same way.

Imports no TVM: :mod:`hago.hwspec` resolves a spec's backend while it loads.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

from hago.errors import SpecError

from .amx.backend import AMXBackend
from .arm import ArmBackend
from .base import Backend
from .cpu import CPUBackend
from .cuda import CudaBackend
from .x86 import X86Backend

if TYPE_CHECKING:  # pragma: no cover
    import tvm

    from hago.hwspec import HardwareSpec

#: name -> backend, in registration order (derivation takes the first match)
BACKENDS: dict[str, Backend] = {}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def register_backend(name: str, backend: Backend) -> Backend:
    """Register ``backend`` under ``name`` (a spec's ``backend:`` key); a name registered again is replaced."""
    if not _NAME.match(name):
        raise SpecError(f"backend name {name!r} must be lowercase letters, digits, '-' or '_'")
    if not isinstance(backend, Backend):
        raise SpecError(f"backend {name!r} must be a hago.backends.Backend, got {type(backend).__name__}")
    backend.name = name
    BACKENDS[name] = backend
    return backend


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``; a one-line SpecError listing the valid names otherwise."""
    if name not in BACKENDS:
        raise SpecError(f"unknown backend {name!r}; valid: {', '.join(backend_names())}")
    return BACKENDS[name]


def target_kinds() -> tuple[str, ...]:
    """The TVM target kinds some backend builds for: what a spec's ``target.kind`` may be."""
    return tuple(dict.fromkeys(b.target_kind for b in BACKENDS.values()))


def cpu_kinds() -> tuple[str, ...]:
    """The target kinds of backends whose builds run on a CPU: what a spec's ``host`` may be."""
    return tuple(dict.fromkeys(b.target_kind for b in BACKENDS.values() if b.device == "cpu"))


def resolve(name: str | None, target_kind: str, intrinsics: Iterable[str] = ()) -> Backend:
    """The backend named ``name``, or the one derived from ``target_kind`` and ``intrinsics``.

    Raises a one-line SpecError for an unknown name, a named backend of
    another target kind, or a kind no backend builds for.
    """
    if name is not None:
        backend = get_backend(name)
        if backend.target_kind != target_kind:
            raise SpecError(f"backend {name} builds for target kind {backend.target_kind!r}, "
                            f"the spec's target is {target_kind!r}")
        return backend
    wanted = set(intrinsics)
    of_kind = [b for b in BACKENDS.values() if b.target_kind == target_kind]
    for backend in of_kind:
        if backend.intrinsics & wanted:
            return backend
    for backend in of_kind:
        if backend.generic:
            return backend
    raise SpecError(f"no backend builds for target kind {target_kind!r} with intrinsics {sorted(wanted)}; "
                    f"name one with 'backend:' (valid: {', '.join(backend_names())})")


def backend_of(spec: HardwareSpec) -> Backend:
    """The backend of a loaded spec (its ``backend:`` key, or derived; see :func:`resolve`)."""
    return resolve(spec.backend, spec.target.get("kind"), spec.intrinsics)


def for_target(target: tvm.target.Target) -> Backend:
    """The backend of a build that names none (a host build): one that claims ``target``, else its kind's generic one."""
    kind = target.kind.name
    for backend in BACKENDS.values():
        if backend.target_kind == kind and backend.claims(target):
            return backend
    return resolve(None, kind)


# the built-in backends, one folder each; derivation tries them in this order (amx before x86: an AMX spec
# lists the x86 intrinsics too)
register_backend("amx", AMXBackend())
register_backend("x86", X86Backend())
register_backend("arm", ArmBackend())
register_backend("cuda", CudaBackend())
register_backend("cpu", CPUBackend())
