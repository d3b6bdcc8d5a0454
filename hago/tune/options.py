"""``TuneOptions``: what ``hago compile --tune-trials/--cache-dir/--rpc`` asks of a build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError


@dataclass(frozen=True)
class TuneOptions:
    """Tuning settings for the builds of one device.

    ``rpc`` is ``(tracker "host:port", key)`` where candidates are timed; None
    times them on this CPU, which is only right when the device is this
    machine (``for_spec`` enforces that).
    """

    trials: int = 0  # per task; 0 applies cached schedules only
    cache_dir: Path | None = None  # None: $HAGO_CACHE_DIR or ~/.cache/hago/tuning
    device_key: str = "local"
    rpc: tuple[str, str] | None = None
    cross_compiler: str | None = None
    progress: bool = True

    @classmethod
    def for_spec(cls, spec, trials: int = 0, cache_dir: str | Path | None = None, tracker: str | None = None,
                 progress: bool = True) -> TuneOptions:
        """Options for ``spec`` (a :class:`~hago.hwspec.HardwareSpec`): its name keys the cache.

        A device other than this machine (remote, or cross-compiled) needs an
        RPC tracker to tune: ``tracker`` or the spec's ``rpc.tracker``.
        """
        rpc = None
        if not spec.is_local:
            tracker = tracker or (spec.rpc.tracker if spec.rpc else None)
            key = spec.rpc.key if spec.rpc else None
            if tracker and key:
                rpc = (tracker, key)
            elif trials > 0:
                raise BuildError(f"tuning for {spec.name} times candidates on the device: pass --rpc HOST:PORT "
                                 "(and give the spec an rpc.key), or use --tune-trials 0")
        return cls(trials, Path(cache_dir) if cache_dir else None, spec.name, rpc, spec.cross_compiler, progress)
