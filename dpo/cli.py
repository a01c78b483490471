"""The command-line convention shared by train.py, generate.py and dpo.evaluate: a user error is one line."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from dpo.errors import UserError


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run `main`; a UserError prints `error: <message>` on stderr and returns 2, Ctrl-C `interrupted` and 130 (no
    traceback: what the program writes is written atomically, so an interruption leaves nothing half done)."""
    try:
        return main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except a None one and where the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
