"""``error_line``: the one line of an exception a one-line error or a failed measurement shows."""

from __future__ import annotations

from hago.errors import error_line


def test_last_line_is_tvms_reason_after_its_backtrace():
    e = RuntimeError("Traceback (most recent call last):\n  0: tvm::foo\n\n  InternalError: Check failed: x  \n")
    assert error_line(e) == "InternalError: Check failed: x"
    assert error_line(e, "first") == "Traceback (most recent call last):"


def test_limit_type_and_empty_messages():
    e = ValueError("x" * 500)
    assert error_line(e) == "x" * 200 and error_line(e, limit=None) == "x" * 500
    assert error_line(e, limit=3, with_type=True) == "ValueError: xxx"
    assert error_line(KeyError()) == "KeyError" and error_line(KeyError(), with_type=True) == "KeyError"
    assert error_line("  \n") == "" and error_line("a\nb\n") == "b"
