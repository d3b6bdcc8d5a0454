"""One exception family for everything hago reports to a user.

Every error a user can cause (bad spec, bad model, bad data, failed build or
measurement) is a :class:`HagoError`. The CLI prints its one-line message and
exits 2; tracebacks appear only under ``--debug``. Each subclass also derives
from the closest builtin so callers that catch ``ValueError``/``RuntimeError``
keep working, the way ``tvm.error`` does it.
"""


class HagoError(Exception):
    """Base class: a problem the user can fix, with a one-line message."""


class SpecError(HagoError, ValueError):
    """A hardware spec is malformed: the message names the file, key and problem."""


class FrontendError(HagoError, ValueError):
    """A model cannot be loaded or converted to Relax."""


class DataError(HagoError, ValueError):
    """Calibration or evaluation data is missing, empty, mis-shaped or not finite."""


class CalibrationError(HagoError, ValueError):
    """Calibration could not produce thresholds (unknown method, no statistics)."""


class QuantizeError(HagoError, ValueError):
    """A strategy cannot be applied to a graph (wrong graph hash, unknown op)."""


class BuildError(HagoError, RuntimeError):
    """TVM failed to compile or export a build."""


class MeasureError(HagoError, RuntimeError):
    """A latency or accuracy measurement failed, crashed or timed out."""


def error_line(error: BaseException | str, which: str = "last", limit: int | None = 200, *,
               with_type: bool = False) -> str:
    """One line of ``error``'s message, for a one-line error or a failed :class:`~hago.measure.Measurement`.

    TVM ends its messages with the reason after a C++ backtrace (``which="last"``);
    Python, numpy and ONNX put it first (``which="first"``). Blank lines are
    skipped and the line is cut to ``limit`` characters. An exception with an
    empty message gives its type name; ``with_type`` prefixes the type name
    (``"ValueError: ..."``). A string (a child's stderr) gives ``""`` when blank.
    """
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    line = (lines[-1] if which == "last" else lines[0])[:limit] if lines else ""
    if not isinstance(error, BaseException):
        return line
    name = type(error).__name__
    if with_type:
        return f"{name}: {line}" if line else name
    return line or name


def check(cond: bool, exc: type[HagoError], msg: str) -> None:
    """Raise ``exc(msg)`` unless ``cond``; keeps validation one line per rule."""
    if not cond:
        raise exc(msg)
