"""What every command prints at its end: a one-screen summary."""

from __future__ import annotations

from typing import Any

from mga.errors import MGAError


def print_summary(title: str, rows: dict[str, Any]) -> None:
    width = max((len(key) for key in rows), default=0)
    print(f"\n== {title} ==", flush=True)
    for key, value in rows.items():
        print(f"  {key.ljust(width)}  {value}", flush=True)


class JobFailed(MGAError):
    """A job that ran and failed (as opposed to bad input): one line, exit code 1."""


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`: enough to name a failure in a one-line error."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].rstrip('.') if text else ''}".rstrip(": ")
