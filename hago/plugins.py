"""One way to register plug-in classes by name (calibrators, corrections).

A registry is a plain ``dict[str, type]``; ``registrar`` makes its class
decorator, so every kind of plug-in refuses a second class under a taken
name the same way, and every registered class knows its own ``name``.
"""

from __future__ import annotations

from typing import Callable, TypeVar

_T = TypeVar("_T", bound=type)


def registrar(table: dict[str, type], what: str, error: type[Exception]) -> Callable[[str], Callable[[_T], _T]]:
    """``register(name)``: a class decorator adding the class to ``table`` and setting ``cls.name``."""

    def register(name: str) -> Callable[[_T], _T]:
        def wrap(cls: _T) -> _T:
            if name in table and table[name] is not cls:
                raise error(f"{what} {name!r} is registered twice; rename one")
            cls.name = name
            table[name] = cls
            return cls

        return wrap

    return register
