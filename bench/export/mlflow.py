"""Write a sweep as MLflow runs: ``initbench export DIR --to mlflow URI``.

MLflow's own shape for a sweep: one parent run (named after the sweep, tagged
``initbench.sweep`` with the spec's fingerprint) and one child run per job (tag
``mlflow.parentRunId``), tagged ``initbench.job_id``, holding the job's settings as
params, its metrics (latest value = the job's metric) and its curves as metric
histories with their steps. Status: FINISHED for ok and diverged jobs, FAILED for
failed ones; the error and pathologies are tags.

Only ``MlflowClient`` is used (no fluent API, so no global active run), and every
write is a ``log_batch`` within MLflow's per-call limits. Params cannot be
overwritten, so exporting again adds only the jobs without a finished child; a
child left unfinished by an interrupted export is deleted and written again.
Per-layer traces are not exported (thousands of metric keys make MLflow's UI
unusable): the store stays the source for them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import UserError
from bench.export import metrics_of, plain, run_names, settings_of

# MLflow's limits per log_batch call (mlflow/utils/validation.py): metrics, params + tags, all together.
MAX_METRICS = 1000
MAX_PARAMS = 100
MAX_ENTITIES = 1000
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
JOB_TAG = "initbench.job_id"
SWEEP_TAG = "initbench.sweep"


@dataclass
class Written:
    """What an export wrote (its ``str`` is the command's one line of output)."""

    uri: str
    experiment: str
    parent: str
    written: int
    skipped: int

    def __str__(self) -> str:
        return (f"mlflow: {self.written} child runs written under parent run {self.parent} in experiment "
                f"{self.experiment!r} at {self.uri} ({self.skipped} already there); "
                f"view with: mlflow ui --backend-store-uri {self.uri}")


def tracking_uri(dest: str) -> str:
    """A tracking URI from DEST: a URI as given, else a SQLite file (a directory gets ``mlflow.db`` in it).

    MLflow's file store (``./mlruns``, ``file:``) is refused: MLflow 3 deprecated it and
    3.13+ will not open it by default.
    """
    if dest.startswith("file:"):
        raise UserError(f"--to mlflow {dest}: MLflow's file store is deprecated; give a SQLite file "
                        "(e.g. runs.db) or a sqlite:/// or http:// tracking URI")
    if "://" in dest or dest.startswith("databricks"):
        return dest
    path = Path(dest)
    if path.is_dir():
        path = path / "mlflow.db"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--to mlflow {dest}: cannot create its directory ({err})") from None
    return f"sqlite:///{path.resolve()}"


def write(results, dest: str, *, experiment: str | None = None) -> Written:
    """Write every job of ``results`` without a finished child run as an MLflow child run.

    Args:
        results: loaded results (:func:`bench.load`).
        dest: a tracking URI (``sqlite:///runs.db``, ``http://host:5000``) or a SQLite file path.
        experiment: the experiment's name (default: the sweep's name); created if missing.

    Returns:
        :class:`Written`: the parent run's id, how many children were written and skipped.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    # Creating a SQLite store logs each schema migration; the command prints one line instead.
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(dest)
    name = experiment or str(results.meta.get("spec_name") or "initbench")
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment(client, name, uri)
        parent = _parent(client, experiment_id, results, name)
        done = _children(client, experiment_id, parent)
        written = skipped = 0
        names = run_names(results)
        settings, metrics = settings_of(results.runs), metrics_of(results.runs)
        curves = {str(j): part for j, part in results.curves.groupby("job_id", observed=True, sort=False)} \
            if not results.curves.empty else {}
        for row in results.runs.to_dict("records"):
            if row["job_id"] in done:
                skipped += 1
                continue
            _child(client, experiment_id, parent, names[row["job_id"]], row, settings, metrics,
                   curves.get(row["job_id"]))
            written += 1
    except MlflowException as err:
        raise UserError(f"--to mlflow {dest}: {str(err).splitlines()[0]}") from None
    return Written(uri, name, parent, written, skipped)


def _experiment(client, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # Artifacts beside the database, not in whatever directory the command ran from.
    location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri() \
        if uri.startswith("sqlite:///") else None
    return client.create_experiment(name, artifact_location=location)


def _parent(client, experiment_id: str, results, name: str) -> str:
    """The sweep's parent run: found by the spec's fingerprint, else created (and marked finished)."""
    fingerprint = str(results.meta.get("fingerprint", ""))
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{fingerprint}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    note = f"initbench sweep `{name}`\n\n```toml\n{results.spec_text}\n```"
    tags = {SWEEP_TAG: fingerprint, "initbench.axes": ",".join(results.axes),
            "mlflow.note.content": note[:MAX_TAG_VALUE]}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _children(client, experiment_id: str, parent: str) -> set[str]:
    """Job ids that already have a finished child; unfinished ones (an interrupted export) are deleted."""
    done: set[str] = set()
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                  max_results=1000, page_token=token)
        for run in page:
            job = run.data.tags.get(JOB_TAG)
            if run.info.status in ("FINISHED", "FAILED") and job:
                done.add(job)
            else:
                client.delete_run(run.info.run_id)
        token = page.token
        if not token:
            return done


def _child(client, experiment_id: str, parent: str, name: str, row: dict, settings: list[str],
           metrics: list[str], curves) -> None:
    from mlflow.entities import Metric, Param

    tags = {"mlflow.parentRunId": parent, JOB_TAG: row["job_id"], "initbench.status": row["status"],
            "initbench.pathologies": str(row.get("pathologies") or ""),
            "initbench.error": str(row.get("error") or "")[:MAX_TAG_VALUE]}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    params = [Param(key, str(value)[:MAX_PARAM_VALUE]) for key in settings
              if (value := plain(row[key])) is not None]
    last = 0
    points: list = []
    if curves is not None and not curves.empty:
        steps = curves["step"].to_numpy()
        last = int(steps.max())
        for column in curves.columns:
            if column in ("job_id", "step"):
                continue
            values = curves[column].to_numpy(dtype=float)
            points += [Metric(column, float(v), now, int(s)) for s, v in zip(steps, values)
                       if not np.isnan(v)]
    for key in metrics:
        value = plain(row[key])
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            points.append(Metric(key, float(value), now, last))
    for metric_batch, param_batch in batches(points, params):
        client.log_batch(run_id, metrics=metric_batch, params=param_batch)
    client.set_terminated(run_id, "FAILED" if row["status"] == "failed" else "FINISHED")


def batches(metrics: list, params: list) -> list[tuple[list, list]]:
    """Split metrics and params into ``log_batch`` calls within MLflow's limits.

    Each call carries at most 100 params, at most 1,000 metrics and at most 1,000 entities in all;
    params go first so that a job's settings are complete after its first calls.
    """
    out: list[tuple[list, list]] = []
    m = p = 0
    while m < len(metrics) or p < len(params):
        param_batch = params[p:p + MAX_PARAMS]
        p += len(param_batch)
        room = min(MAX_METRICS, MAX_ENTITIES - len(param_batch))
        metric_batch = metrics[m:m + room]
        m += len(metric_batch)
        out.append((metric_batch, param_batch))
    return out
