"""``initbench export DIR --to tensorboard|mlflow [DEST]``: write a sweep's results to TensorBoard or MLflow.

DEST is TensorBoard's log directory (default DIR/tensorboard) or an MLflow tracking URI
or SQLite file (default DIR/mlflow.db). Rerunning adds only the jobs not yet exported.
Exit codes: 0 written, 2 bad input (no store in DIR, unknown target, extra not installed).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from bench import cli
from bench.errors import EXIT_OK, UserError
from bench.export import TARGETS


def parser() -> cli.Parser:
    """The export command's flags."""
    p = cli.Parser(prog=cli.prog("python -m bench.export"),
                   description=__doc__.splitlines()[0].split(": ", 1)[1],
                   epilog="Install a target's package with pip install 'initbench[tensorboard]' "
                          "or 'initbench[mlflow]'.")
    p.add_argument("directory", metavar="DIR", help="a sweep's output directory (the --out of the sweep)")
    p.add_argument("--to", nargs="+", required=True, metavar=("TARGET", "DEST"),
                   help=f"{' or '.join(TARGETS)}, then optionally where to write")
    p.add_argument("--layers", action="store_true",
                   help="tensorboard: also write per-layer statistics (slow past a few hundred jobs)")
    p.add_argument("--experiment", help="mlflow: the experiment's name (default: the sweep's name)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    if len(args.to) > 2:
        raise UserError(f"--to takes a target and at most one destination, got {' '.join(args.to)}")
    from bench.export import export  # after parsing: --help stays instant

    print(export(args.directory, args.to[0], args.to[1] if len(args.to) > 1 else None,
                 layers=args.layers, experiment=args.experiment))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``initbench export`` (also ``python -m bench.export``)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
