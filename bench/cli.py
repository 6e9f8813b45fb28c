"""What every initbench command shares: one-line errors and exit codes.

Each command module (``bench.sweep``, ``bench.report``, ``bench.regress``,
``bench.audit``) builds its parser with :class:`Parser` and runs its body
through :func:`run`, the one place where :class:`~bench.errors.UserError` is
caught and turned into a single stderr line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from bench.errors import EXIT_USAGE, UserError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags that say how a sweep runs (``bench.sweep``, and ``bench.regress run`` and ``baseline``)."""
    p.add_argument("--jobs", type=positive_int, help="worker processes (default: chosen from the work)")
    p.add_argument("--backend", choices=["loky", "dask", "threading"], help="joblib backend (default: loky)")
    p.add_argument("--scheduler", help="dask scheduler address, e.g. tcp://host:8786")
    p.add_argument("--devices", help="auto | cpu | cuda | cuda:0,cuda:1 (default: auto)")
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


# The name a command's messages give: its ``python -m`` form, or ``initbench <command>`` while the
# initbench dispatcher runs it (bench.__main__), so an error names what the user typed.
_invoked_as: list[str] = []


def prog(module_prog: str) -> str:
    """The program name for a command's parser: ``initbench <command>`` when run through the
    ``initbench`` command, else ``module_prog`` (``python -m bench.<command>``)."""
    return _invoked_as[-1] if _invoked_as else module_prog


def run_as(name: str, body: Callable[[], int]) -> int:
    """Run ``body`` with its messages naming the program ``name`` (``initbench sweep``)."""
    _invoked_as.append(name)
    try:
        return body()
    finally:
        _invoked_as.pop()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2.

    argparse's own error prints the whole usage block first; a CI log wants a
    single line that says what was wrong and what is valid.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        flags = sorted(
            {opt for action in self._actions for opt in action.option_strings if opt.startswith("--")}
        )
        hint = f" (valid flags: {', '.join(flags)})" if "unrecognized" in message else ""
        message = "\\n".join(message.splitlines())  # an argument may hold a line break
        sys.stderr.write(f"{self.prog}: error: {message}{hint}\n")
        sys.exit(EXIT_USAGE)


def run(body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command body, mapping UserError to one stderr line and exit 2."""
    try:
        return body(argv)
    except UserError as err:
        # One line, always: a message that quotes user text could otherwise hold a line break.
        message = "\\n".join(str(err).splitlines())
        sys.stderr.write(f"error: {message}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
