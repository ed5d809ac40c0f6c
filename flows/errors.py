"""How a user-facing error reads: one line per problem, the field path first."""

from __future__ import annotations

from pydantic import ValidationError


def describe_error(exc: Exception) -> str:
    """`str(exc)`, except that a pydantic ValidationError becomes `field.path: message (got value)` lines, without
    the link to pydantic's documentation that its own text ends each problem with."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(map(str, error["loc"])) or exc.title
        got = error.get("input")
        shown = "" if error["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{where}: {error['msg']}{shown}")
    return f"invalid {exc.title}:\n  " + "\n  ".join(lines)
