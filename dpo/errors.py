"""Errors a user can fix, and how their messages are kept to one line.

Every such error derives from `UserError`; the command-line tools (train.py, generate.py, dpo.evaluate) print
it as `error: <message>` and exit with status 2, never with a traceback (dpo.cli.run_cli).
"""

from __future__ import annotations

import re

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class UserError(ValueError):
    """A setting, a file or an input that cannot work, named in one line."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (at most `limit` characters), or its type's name when it has none:
    how a library's multi-line error is quoted inside one of ours."""
    text = ANSI_ESCAPE.sub("", str(error)).strip()  # torch's messages bold some words for a terminal
    return text.splitlines()[0][:limit] if text else type(error).__name__


class TrainingError(UserError):
    """The run cannot continue (e.g. a NaN loss); the last good checkpoint is left intact."""
