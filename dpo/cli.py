"""The command-line convention shared by train.py, generate.py and dpo.evaluate: a user error is one line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable, NoReturn

from dpo.errors import UserError


def _interrupted_while_starting(signum: int, frame: object) -> None:
    # an exit, not an exception: the handler may run inside a finalizer or callback of the imports, where Python
    # prints an exception as ignored and goes on; nothing is written yet that an exit could leave half done
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(2, b"interrupted\n")
    os._exit(130)


def exit_quietly_on_interrupt() -> None:
    """Ctrl-C from now until run_cli starts prints `interrupted` and exits 130: an entry point calls this before its
    imports (torch and transformers take seconds), where a KeyboardInterrupt would be a traceback from inside them."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run `main`; a UserError prints `error: <message>` on stderr and returns 2, Ctrl-C `interrupted` and 130 (no
    traceback: what the program writes is written atomically, so an interruption leaves nothing half done)."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is _interrupted_while_starting):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a KeyboardInterrupt, caught below
    try:
        return main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, as every other user error: `error: <message>` and where to find
    the flags (argparse prints the whole usage first, 60 lines for train.py), exit status 2 as argparse's."""

    def error(self, message: str) -> NoReturn:
        """Print `error: <message> (<prog> --help lists the flags)` and exit 2."""
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except a None one and where the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
