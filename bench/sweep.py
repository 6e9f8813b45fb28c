"""``python -m bench.sweep SPEC.toml``: train every job of a spec, store the results, resume.

Exit codes: 0 done (diverged jobs are results), 1 some jobs failed, 2 bad input or an output
directory that cannot be used (another sweep writes it, its store is damaged, its disk is full),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from bench import cli
from bench.runner import RunOptions, run


def parser() -> cli.Parser:
    p = cli.Parser(prog=cli.prog("python -m bench.sweep"), description=__doc__.splitlines()[0])
    p.add_argument("spec", help="the sweep spec (TOML)")
    p.add_argument("--out", help="output directory (default: reports/<spec name>/)")
    cli.add_run_flags(p)
    p.add_argument("--fresh", action="store_true", help="delete earlier results in --out first")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.scheduler and args.backend not in (None, "dask"):
        parser().error("--scheduler needs --backend dask")
    if args.scheduler:
        args.backend = "dask"
    return run(args.spec, RunOptions.from_args(args))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
