"""``python -m bench.advise MODEL --task TASK``: which init for this network, in one command.

A step-0 screen of every applicable scheme, a budgeted sweep of the ones that start well, and a
ranked recommendation with its evidence (bench.advice). Writes DIR/advice.json, DIR/advise.toml
(the sweep it ran: rerun or extend it with bench.sweep) and DIR/report.html.

Exit codes: 0 advice given, 2 bad input (one line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cli
from bench.errors import EXIT_OK


def setting(text: str) -> tuple[str, Any]:
    """``name=value``, the value read as a TOML value (``4``, ``0.5``, ``true``, ``"batch"``), else text."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected name=value like channels=32, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: norm=batch
    return name.strip(), value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def parser() -> cli.Parser:
    p = cli.Parser(prog=cli.prog("python -m bench.advise"), description=__doc__.splitlines()[0])
    p.add_argument(
        "model", help="a built-in architecture (mlp, cnn, resmlp, resnet, transformer) or pkg.module:fn"
    )
    p.add_argument(
        "--task", required=True, help="a built-in task (teacher, spirals, digits, markov) or pkg.module:fn"
    )
    p.add_argument(
        "--model-setting",
        action="append",
        type=setting,
        default=[],
        metavar="NAME=VALUE",
        help="a model setting (depth=8, width=64, activation=relu, or the factory's own); repeatable",
    )
    p.add_argument(
        "--task-setting",
        action="append",
        type=setting,
        default=[],
        metavar="NAME=VALUE",
        help="a task setting (n_train=512, images=true, ...); repeatable",
    )
    p.add_argument(
        "--budget", type=positive_float, default=180.0, help="seconds for the whole run (default 180)"
    )
    p.add_argument("--out", type=Path, help="output directory (default: reports/advise-<model>)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--seeds", type=cli.positive_int, default=3, help="seeds per cell (default 3)")
    p.add_argument("--batch-size", type=cli.positive_int, default=64)
    p.add_argument(
        "--fresh", action="store_true", help="start over in --out (default: resume its advise.toml)"
    )
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    from bench import advice, runner  # after parsing: --help and flag errors stay instant

    out = args.out or runner.default_out(f"advise-{args.model.replace(':', '-')}")
    req = advice.Request(
        model=args.model,
        task=args.task,
        model_settings=tuple(args.model_setting),
        task_settings=tuple(args.task_setting),
        budget_s=args.budget,
        optimizer=args.optimizer,
        seeds=args.seeds,
        batch_size=args.batch_size,
        out=out,
        fresh=args.fresh,
    )
    result = advice.advise(req)
    shown = result.screen[
        ["scheme", "act_ratio", "grad_ratio", "dead_frac", "symmetric_frac", "verdict", "flags"]
    ]
    print(
        "step-0 screen (medians over seeds; act_ratio: last/first activation variance, grad_ratio: "
        "first/last weight-gradient norm):"
    )
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(
        "\nranking (loss at each scheme's best learning rate, 95% bootstrap CI over seeds; profile: share of "
        "learning rates within 5% of the best scheme):"
    )
    cols = ["scheme", "best_lr", "loss", "ci_low", "ci_high", "profile"]
    print(result.ranking[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\n{result.paragraph}")
    t = result.timing
    print(
        f"\nbudget {t['budget_s']:.0f} s, used {t['total_s']:.0f} s ({t['steps']} steps x {t['lrs']} "
        f"learning rates x {t['seeds']} seeds); advice: {out / 'advice.json'}; spec: {out / 'advise.toml'}; "
        f"report: {out / 'report.html'}"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m bench.advise``."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
