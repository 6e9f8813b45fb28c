"""``python -m bench.report DIR``: rebuild DIR/report.html from a sweep's results store.

Exit codes: 0 written, 2 bad input (no such directory, no store in it).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from bench import cli
from bench.errors import EXIT_OK


def parser() -> cli.Parser:
    p = cli.Parser(prog=cli.prog("python -m bench.report"), description=__doc__.splitlines()[0])
    p.add_argument("directory", help="a sweep's output directory (the --out of bench.sweep)")
    p.add_argument("--verbose", action="store_true", help="log how long each part of the report took")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.verbose:
        logging.getLogger("bench.report").setLevel(logging.DEBUG)
    from bench.report import build  # after parsing: --help and flag errors stay instant

    print(f"report: {build(args.directory)}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
