"""How a user-facing error reads: one line per problem, the field path first, no password of a URI."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from infra.artifacts import redact_uri_text

ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # they log a failing run's traceback at ERROR


def describe_error(exc: Exception) -> str:
    """`str(exc)`, except that a pydantic ValidationError becomes `field.path: message (got value)` lines, without
    the link to pydantic's documentation that its own text ends each problem with; URI passwords masked."""
    if not isinstance(exc, ValidationError):
        return redact_uri_text(str(exc))
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(map(str, error["loc"])) or exc.title
        got = error.get("input")
        shown = "" if error["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{where}: {error['msg']}{shown}")
    return redact_uri_text(f"invalid {exc.title}:\n  " + "\n  ".join(lines))


MAX_LINE = 300  # characters of a log line kept by `one_line` (an exception's repr can hold a whole binary file)


def one_line(record: logging.LogRecord) -> bool:
    """A logging filter: a record with a traceback is dropped (the CLI reports that error itself), any other keeps
    its first line, cut at MAX_LINE."""
    if record.exc_info or record.exc_text:
        return False
    first = next(iter(record.getMessage().splitlines()), "")
    record.msg, record.args = redact_uri_text(first if len(first) <= MAX_LINE else first[: MAX_LINE - 3] + "..."), ()
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def quiet_engine_logs() -> None:
    """Prefect's engine logs a failing task or flow run with its whole traceback (hundreds of lines, and a binary
    input's bytes); keep one line of each record without one."""
    for name in ENGINE_LOGGERS:
        logging.getLogger(name).addFilter(one_line)
