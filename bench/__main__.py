"""``initbench COMMAND ...`` (and ``python -m bench COMMAND ...``): one command for every tool.

Each subcommand is a module's own ``main(argv)``, so ``initbench sweep X`` and
``python -m bench.sweep X`` are the same program with the same flags and exit
codes. Modules are imported only when their command runs: ``initbench --help``
does not pay for torch, pandas or an exporter's package.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from bench import cli
from bench.environment import VERSION as __version__

# name -> (module whose main(argv) runs it, one line of help). A new command is one entry.
COMMANDS: dict[str, tuple[str, str]] = {
    "sweep": ("bench.sweep", "train a spec's jobs into a results store and write its report"),
    "report": ("bench.report.__main__", "rebuild DIR/report.html from a results store"),
    "regress": ("bench.regress", "compare a sweep against a stored baseline (exit 1 on a regression)"),
    "audit": ("bench.audit", "fingerprint what PyTorch's layer constructors draw"),
    "export": ("bench.export.__main__", "write a results store to TensorBoard or MLflow"),
    "advise": ("bench.advise", "which init for a network: a step-0 screen, a budgeted sweep, a ranking"),
}


def command(name: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main(argv)`` of a subcommand; an unknown name is a :class:`~bench.errors.UserError`."""
    from bench.errors import UserError

    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[name][0]).main


def parser() -> cli.Parser:
    """The top-level parser: only --help, --version and the command name (the rest goes to the command)."""
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    p = cli.Parser(prog="initbench", description="Benchmark neural-network weight initialization in PyTorch.",
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog=f"commands:\n{listing}\n\n'initbench COMMAND --help' shows a command's own flags.")
    p.add_argument("--version", action="version", version=f"initbench {__version__}")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments and flags")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point ``initbench``: dispatch to a subcommand's ``main(argv)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = "python -m bench" if sys.argv and sys.argv[0].endswith("__main__.py") else "initbench"
    if argv and argv[0] in COMMANDS:  # the common case: no top-level parse, the command sees all its flags
        return cli.run_as(f"{top} {argv[0]}", lambda: command(argv[0])(argv[1:]))
    p = parser()
    if not argv:
        p.error(f"missing COMMAND; choose from {', '.join(COMMANDS)} (or --help)")
    args = p.parse_args(argv)  # --help, --version, or a one-line error (exit 2)
    return cli.run_as(f"{top} {args.command}", lambda: command(args.command)(args.args))


if __name__ == "__main__":
    sys.exit(main())
