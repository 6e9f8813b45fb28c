"""Write a sweep as TensorBoard runs: ``initbench export DIR --to tensorboard OUT``.

Layout (what TensorBoard's run selector and HParams dashboard expect):

- ``OUT/<run name>/``, one directory per job, named by its axis values
  (``init=zeros,depth=8,lr=0.03,seed=1``): its curves as scalars ``curves/<column>``
  at their steps, its metrics as ``summary/<metric>`` (never a curve's tag, or the
  dashboard would show the curve's last value), and its HParams session: every
  setting but the seed, ``group_name`` = the run name without the seed (so the
  dashboard aggregates seeds: median, mean, min, max), and the end status
  (FAILURE for failed jobs). With ``layers=True`` also every per-layer statistic as
  ``<param>/<stat>/<layer>``.
- ``OUT/`` itself holds one event file with the HParams experiment: every setting
  and metric of the sweep, so the dashboard's columns do not depend on which job
  it reads first.

Everything goes through torch's ``SummaryWriter`` (which needs only the
``tensorboard`` package, no TensorFlow); three traps of its convenience methods are
avoided on purpose: ``add_hparams`` writes a separate run per call (pytorch#32651),
``add_scalars`` a directory per key, and neither can set a session's group. A job's
directory is written under a temporary name and renamed when complete, so an
export can be rerun into the same OUT: jobs already there are skipped.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import UserError
from bench.export import axis_column, metrics_of, plain, run_names, settings_of

CURVE_TAG = "curves/{}"
METRIC_TAG = "summary/{}"
EXPERIMENT_SUFFIX = ".initbench-hparams"
MANY_RUNS = 1000  # TensorBoard's run selector and HParams dashboard slow down well before this
_STAT_SKIP = ("job_id", "step", "layer", "param", "index")


@dataclass
class Written:
    """What an export wrote (its ``str`` is the command's one line of output)."""

    out: Path
    written: int
    skipped: int
    layers: bool

    def __str__(self) -> str:
        extra = " with per-layer statistics" if self.layers else ""
        return (f"tensorboard: {self.written} runs written{extra} to {self.out} "
                f"({self.skipped} already there); view with: tensorboard --logdir {self.out}")


def write(results, dest: str | Path, *, layers: bool = False) -> Written:
    """Write every job of ``results`` not yet in ``dest`` as a TensorBoard run.

    Args:
        results: loaded results (:func:`bench.load`).
        dest: the log directory (created if needed); point ``tensorboard --logdir`` at it.
        layers: also write per-layer statistics (slow for large sweeps: a scalar per layer,
            kind, statistic and logged step).

    Returns:
        :class:`Written`: how many runs were written and how many were already there.
    """
    from torch.utils.tensorboard import SummaryWriter

    out = Path(dest)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--to tensorboard {out}: cannot create the log directory ({err})") from None
    runs = results.runs
    if len(runs) > MANY_RUNS:
        print(f"note: {len(runs)} runs; TensorBoard's dashboards get slow past a few hundred",
              file=sys.stderr)
    axes = [axis_column(a) for a in results.axes]
    # The axes first: the dashboard's columns follow the experiment's order.
    settings = sorted((c for c in settings_of(runs) if c != "seed"), key=lambda c: c not in axes)
    metrics = metrics_of(runs)
    names, groups = run_names(results), run_names(results, seed=False)
    hparams, domains = _hparams(runs, settings)
    _write_experiment(SummaryWriter, out, hparams, domains, metrics)
    curves = _by_job(results.curves)
    traces = _by_job(results.layers) if layers else {}
    written = skipped = 0
    for i, row in enumerate(runs.to_dict("records")):
        job = row["job_id"]
        final = out / names[job]
        if final.exists():
            skipped += 1
            continue
        partial = out / f".{names[job]}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        writer = SummaryWriter(log_dir=str(partial))
        try:
            events = writer._get_file_writer()  # the writer's event file (what add_hparams writes to)
            last = _write_frame(events, curves.get(job), CURVE_TAG.format)
            for summary in _session(hparams[i], groups[job] or str(results.meta.get("spec_name", "all")),
                                    row["status"], metrics):
                events.add_summary(summary, global_step=last)
            events.add_summary(_summary({METRIC_TAG.format(m): row[m] for m in metrics}), global_step=last)
            if layers:
                _write_layers(events, traces.get(job))
        finally:
            writer.close()
        partial.rename(final)
        written += 1
    return Written(out, written, skipped, layers)


def _by_job(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    if frame.empty:
        return {}
    return {str(job): part for job, part in frame.groupby("job_id", observed=True, sort=False)}


def _summary(values: dict[str, float]):
    """One Summary holding many scalars: one event per step, not one per scalar (much faster to write)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()
                          if v is not None and not np.isnan(v)])


def _write_frame(events, frame: pd.DataFrame | None, tag) -> int:
    """Write a job's curves, one event per step; returns the last step (0 without curves)."""
    if frame is None or frame.empty:
        return 0
    columns = [c for c in frame.columns if c not in ("job_id", "step") and frame[c].notna().any()]
    steps = frame["step"].to_numpy()
    values = frame[columns].to_numpy(dtype=float)
    for step, row in zip(steps, values):
        events.add_summary(_summary({tag(c): v for c, v in zip(columns, row)}), global_step=int(step))
    return int(steps.max())


def _write_layers(events, frame: pd.DataFrame | None) -> None:
    """Per-layer statistics as ``<param>/<stat>/<layer>`` scalars (the layer label used as text, opaque)."""
    if frame is None or frame.empty:
        return
    stats = [c for c in frame.columns if c not in _STAT_SKIP and frame[c].notna().any()]
    values = frame[stats].to_numpy(dtype=float)
    labels = [f"{p}/{{}}/{layer}" for p, layer in zip(frame["param"].astype(str), frame["layer"].astype(str))]
    for step, rows in pd.Series(np.arange(len(frame))).groupby(frame["step"].to_numpy(), sort=True):
        scalars = {labels[r].format(s): values[r, k] for r in rows for k, s in enumerate(stats)}
        events.add_summary(_summary(scalars), global_step=int(step))


def _hparams(runs: pd.DataFrame, settings: list[str]) -> tuple[list[dict], dict[str, list[str]]]:
    """Each job's HParams values, and the discrete domains of the text-valued settings.

    The dashboard takes numbers, strings and bools: tuples (``betas``) become text, and so does
    every value of a column that mixes numbers and text (``init_bias``: "auto" or a number),
    since a column's values must share one type. Missing values (another scheme's parameter)
    are left out of that job's session.
    """
    table = {c: [plain(v) for v in runs[c]] for c in settings}
    for column, values in table.items():
        kinds = {isinstance(v, str) for v in values if v is not None}
        if len(kinds) > 1:
            table[column] = [None if v is None else str(v) for v in values]
    domains = {c: sorted(set(v for v in values if v is not None), key=str)
               for c, values in table.items() if any(isinstance(v, str) for v in values)}
    rows = [{c: table[c][i] for c in settings if table[c][i] is not None} for i in range(len(runs))]
    return rows, domains


def _write_experiment(writer_class, out: Path, hparams: list[dict], domains: dict,
                      metrics: list[str]) -> None:
    """The sweep's HParams experiment (all settings and metrics) in OUT's own event file (replacing older)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    union: dict = {}
    for row in hparams:
        for key, value in row.items():
            union.setdefault(key, value)
    for old in out.glob(f"events.out.tfevents.*{EXPERIMENT_SUFFIX}"):
        old.unlink()
    experiment, _, _ = hparams_summaries(union, {METRIC_TAG.format(m): 0.0 for m in metrics},
                                         {k: v for k, v in domains.items() if k in union})
    with writer_class(log_dir=str(out), filename_suffix=EXPERIMENT_SUFFIX) as writer:
        writer._get_file_writer().add_summary(experiment)


def _session(values: dict, group: str, status: str, metrics: list[str]):
    """The job's session start (its hparams and group) and end (its status) summaries."""
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    _, start, end = hparams_summaries(values, {METRIC_TAG.format(m): 0.0 for m in metrics})
    # torch's helper cannot set a group or a status: decode its plugin data, set them, encode again.
    for summary, edit in ((start, lambda d: setattr(d.session_start_info, "group_name", group)),
                          (end, lambda d: setattr(d.session_end_info, "status",
                                                  Status.STATUS_FAILURE if status == "failed"
                                                  else Status.STATUS_SUCCESS))):
        plugin = summary.value[0].metadata.plugin_data
        data = HParamsPluginData.FromString(plugin.content)
        edit(data)
        plugin.content = data.SerializeToString()
    return start, end
