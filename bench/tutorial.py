"""``python -m bench.tutorial DIR [--job JOB_ID]``: replay the tutorial's printout from stored probes.

The tutorial this project grew from trains a 2-4-1 ReLU network on ten samples and, after each
epoch's update, prints ``Epoch N`` and every parameter's mean (``0.weight``, ``0.bias``,
``2.weight``, ``2.bias``: ``nn.Sequential`` numbering, so linear layer i is module 2 * i). This
command prints the same lines from a sweep's results store (``sweeps/blog.toml`` reproduces the
tutorial), with no retraining.

Our probe at step s describes the state that step starts from, i.e. the parameters after s updates;
the tutorial prints after the update, so its ``Epoch N`` is our step N + 1. When a step is not a
whole epoch (a batch smaller than the training set), the header says ``Step s`` instead.

Exit codes: 0 printed, 2 bad input (no store, unknown or ambiguous job, a job without probes).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pandas as pd

from bench import cli
from bench.errors import EXIT_OK, UserError


def parser() -> cli.Parser:
    p = cli.Parser(prog="python -m bench.tutorial", description=__doc__.splitlines()[0])
    p.add_argument("dir", help="a sweep's output directory (e.g. reports/blog)")
    p.add_argument("--job", help="the job id, or a unique prefix of it (needed when DIR holds several jobs)")
    return p


def pick_job(runs: pd.DataFrame, job: str | None) -> pd.Series:
    """The runs row of ``job`` (an id or a unique prefix); without ``job``, the store's only job."""
    ids = sorted(runs["job_id"]) if len(runs) else []
    if job is None:
        if len(ids) != 1:
            raise UserError(f"the store holds {len(ids)} jobs; choose one with --job "
                            f"(ids: {', '.join(ids[:10])}{', ...' if len(ids) > 10 else ''})")
        job = ids[0]
    matches = [i for i in ids if i.startswith(job)]
    if len(matches) != 1:
        what = "matches no job" if not matches else f"is ambiguous ({len(matches)} jobs)"
        raise UserError(f"--job {job!r} {what}; choose from {ids[:10]}{' ...' if len(ids) > 10 else ''}")
    row = runs[runs["job_id"] == matches[0]].iloc[0]
    if row["status"] == "failed":
        raise UserError(f"job {row['job_id']} failed ({row['error']}); it has no probes to print")
    return row


def epoch_lines(layers: pd.DataFrame, run: pd.Series, full_batch: bool) -> list[str]:
    """The tutorial's printout for one job: a header per logged step after step 0, then each mean.

    Args:
        layers: the store's layers table (any jobs; only ``run``'s rows are used).
        run: the job's row of the runs table.
        full_batch: one step is one epoch (the batch is the whole training set): headers say
            ``Epoch N`` for step N + 1, as the tutorial does; otherwise ``Step s``.
    Returns:
        Lines like ``Epoch 0``, ``0.weight -0.0607...``, in the order nn.Module.named_parameters gives.
    """
    own = layers[(layers["job_id"] == run["job_id"]) & layers["param"].isin(["weight", "bias"])]
    means = own.set_index(["step", "layer", "param"])["mean"]
    lines = []
    for step in sorted(s for s in own["step"].unique() if s > 0):
        lines.append(f"Epoch {step - 1}" if full_batch else f"Step {step}")
        for layer in range(int(run["depth"])):
            for param in ("weight", "bias"):
                lines.append(f"{2 * layer}.{param} {float(means[(step, str(2 * layer), param)])!r}")
    return lines


def _full_batch(run: pd.Series) -> bool:
    from bench.train import tasks

    # .item(): pandas hands back numpy scalars, which torch.Generator.manual_seed refuses
    params = tuple(sorted((k[5:], v.item() if hasattr(v, "item") else v) for k, v in run.items()
                          if k.startswith("task.") and pd.notna(v)))
    try:
        n_train = len(tasks.load(run["task"], params, int(run["seed"])).x_train)
    except Exception:  # noqa: BLE001 - the data are only needed to name the steps
        return False
    return int(run["batch_size"]) >= n_train


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    from bench.store import load

    results = load(args.dir)
    run = pick_job(results.runs, args.job)
    lines = epoch_lines(results.layers, run, _full_batch(run))
    if not lines:
        raise UserError(f"job {run['job_id']} has no probes after step 0; rerun it with steps >= 1")
    print("\n".join(lines))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
