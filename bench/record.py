"""A job's result: what a worker sends back to the parent, and how a bundle becomes results.

Workers return :class:`JobResult` objects (plain data, picklable, no file
handles); only the parent writes them to the store. A job that raised is a
result too, with ``status = "failed"`` and its error: never a missing row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bench import metrics, theory
from bench.errors import UserError
from bench.job import Job
from bench.schema import CURVE_COLUMNS, LAYER_COLUMNS, MODULE_COLUMNS, SIGNALS, STATS, STATUSES
from bench.settings import MetricsConfig
from bench.train.bundle import BundleOutput


@dataclass
class JobResult:
    """One job's outcome: status, metrics, curves and layer traces (empty tables when it failed)."""

    job_id: str
    settings: dict[str, Any]
    status: str
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    pathologies: str = ""
    wall_s: float = float("nan")
    env: dict[str, str] = field(default_factory=dict)
    curves: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(CURVE_COLUMNS)))
    layers: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(LAYER_COLUMNS)))
    modules: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(MODULE_COLUMNS)))

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")


def failed(job: Job, error: str, env: dict[str, str], wall_s: float = float("nan")) -> JobResult:
    """The row of a job that raised: every metric NaN, the error kept."""
    return JobResult(job.job_id, job.settings(), "failed", error=error,
                     metrics={name: float("nan") for name in metrics.METRICS}, wall_s=wall_s, env=env)


_Q, _Q_PRED = len(STATS), len(STATS) + 1  # where q and q_pred follow the stats in a trace row


def _predicted_q(job: Job, out: BundleOutput, k: int) -> np.ndarray:
    """Theory's prediction of job ``k``'s second moments at step 0, one per :func:`_theory_rows` row.

    An MLP's preactivations (mean-field, from the scheme's formula: NaN for a job with init rules,
    since theory knows the scheme, not what the rules changed after it); a residual MLP's stream
    (from its initialized weights, so any scheme and rules are covered); nothing for other models.
    """
    q0 = float(out.input_q[k])
    try:
        if out.dims:
            if job.init_rules:
                return np.full(len(out.dims) - 1, np.nan)
            return theory.predicted_preact_variance(job.init, job.activation, out.dims, q0,
                                                    params=dict(job.init_params), init_bias=job.init_bias)
        if out.streams and out.streams[k] is not None:
            return theory.stream_variance(out.streams[k], q0)
    except (UserError, ValueError, ArithmeticError):
        pass
    return np.full(len(_theory_rows(out)), np.nan)


def _theory_rows(out: BundleOutput) -> np.ndarray:
    """The trace rows theory predicts, in its order: an MLP's preactivations (``preact``), a residual
    MLP's stem, stream after each block and head (``output``); none for other models."""
    if out.dims:
        return np.flatnonzero([r.param == "preact" for r in out.rows])
    stream = next((s for s in out.streams if s is not None), None)
    if stream is None:
        return np.array([], dtype=int)
    where = {(r.module, r.param): i for i, r in enumerate(out.rows)}
    return np.array([where[(name, "output")] for name in stream.modules])


def _traces(out: BundleOutput, predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Every job's layer-trace values: (K, n_log, rows, STATS + q + q_pred), float64.

    Job-major, so that each job's rows are one contiguous run of the bundle's table. ``q`` is the
    measured second moment (mean^2 + std^2) of module outputs (``act``, ``preact``, ``output``), NaN
    for parameters; ``q_pred`` is theory's prediction (``predicted``, (K, len(targets))) for the rows
    ``targets`` at step 0. Kept in float64 until stored (as float32): a second moment
    overflows float32 when the std passes 1.8e19, which an exploding net's deep layers reach while
    their entries are finite.
    """
    n_log, k, n_rows = out.row_stats.shape[:3]
    block = np.full((k, n_log, n_rows, len(STATS) + 2), np.nan)
    block[..., :len(STATS)] = out.row_stats.transpose(1, 0, 2, 3)
    params = np.array([r.param for r in out.rows])
    signal = np.isin(params, SIGNALS)
    mean, std = block[:, :, signal, STATS.index("mean")], block[:, :, signal, STATS.index("std")]
    block[:, :, signal, _Q] = mean ** 2 + std ** 2
    for i in np.flatnonzero(out.log_steps == 0):
        block[:, i, targets, _Q_PRED] = predicted
    return block


def _rows(table: pd.DataFrame, start: int, stop: int) -> pd.DataFrame:
    """Rows [start, stop) of a bundle's table as a job's own table (own memory, index from 0)."""
    part = table.iloc[start:stop].copy()
    part.index = pd.RangeIndex(stop - start)
    return part


def from_bundle(jobs: list[Job], out: BundleOutput, cfg: MetricsConfig, wall_s: float,
                env: dict[str, str]) -> list[JobResult]:
    """Turn a trained bundle's arrays into one :class:`JobResult` per job.

    Both tables are built once for the whole bundle, straight from numpy, and each job gets its
    slice: built job by job, pandas' per-call overhead came to ~1.5 ms a job.
    """
    if not jobs:
        return []
    n_log, k_jobs, rows = out.row_stats.shape[:3]
    train = np.stack([metrics.window_means(out.losses[:, k], out.log_steps, job.log_every)
                      for k, job in enumerate(jobs)])
    # Signal propagation: measured second moment of each layer's preactivation (a residual MLP's
    # stream) at step 0 next to theory's prediction for this init, activation and input.
    targets = _theory_rows(out)
    predicted = np.array([_predicted_q(job, out, k) for k, job in enumerate(jobs)]).reshape(k_jobs, -1)
    block = _traces(out, predicted, targets)
    curves = pd.DataFrame({"step": np.tile(out.log_steps, k_jobs), "train_loss": train.ravel(),
                           "val_loss": out.val_loss.T.ravel(), "val_acc": out.val_acc.T.ravel(),
                           "grad_norm": out.grad_norm.T.ravel()})
    # Compact dtypes: 10,000 jobs' traces are tens of millions of rows (float32 stats, int32
    # indices, a categorical param).
    with np.errstate(over="ignore"):  # beyond float32's range (3.4e38) a statistic is stored as inf
        values = block.reshape(-1, block.shape[-1]).astype(np.float32)
    names, name_codes = np.unique([r.module for r in out.rows], return_inverse=True)
    kinds, kind_codes = np.unique([r.param for r in out.rows], return_inverse=True)
    layers = pd.DataFrame({"step": np.tile(np.repeat(out.log_steps.astype(np.int32), rows), k_jobs),
                           "layer": pd.Categorical.from_codes(np.tile(name_codes, k_jobs * n_log),
                                                              categories=list(names)),
                           "index": np.tile(np.array([r.index for r in out.rows], np.int32), k_jobs * n_log),
                           "param": pd.Categorical.from_codes(np.tile(kind_codes, k_jobs * n_log),
                                                              categories=list(kinds)),
                           **dict(zip((*STATS, "q", "q_pred"), values.T))})
    modules = pd.DataFrame(out.modules, columns=list(MODULE_COLUMNS))
    at0 = out.log_steps == 0
    params = [r.param for r in out.rows]
    # The outputs of the modules that hold weights, the head's (the last) excepted: the activation
    # ratio's rows for a model without activation modules (no pooling, dropout or stream rows).
    holders = {r.module for r in out.rows if r.param == "weight"}
    hidden_outputs = [i for i, r in enumerate(out.rows) if r.param == "output" and r.module in holders][:-1]
    results = []
    for k, job in enumerate(jobs):
        div = int(out.diverged_at[k])
        # Log steps increase, so the steps up to divergence are a prefix of them. The step a job
        # diverges at, when logged, is kept: its record is the state the job diverged from (at
        # step 0, the initialization itself).
        n = int(np.searchsorted(out.log_steps, div, side="right")) if div >= 0 else n_log
        m = metrics.job_metrics(out.log_steps[:n], train[k, :n], out.val_loss[:n, k], out.val_acc[:n, k],
                                params, out.row_stats[:n, k], div, job.steps, cfg,
                                null_loss=float(out.null_loss[k]), hidden_outputs=hidden_outputs)
        m["signal_error"] = metrics.signal_error(block[k, at0][:, targets, _Q].ravel(), predicted[k])
        flags = metrics.pathologies(m, cfg)
        results.append(JobResult(job.job_id, job.settings(), "diverged" if div >= 0 else "ok",
                                 metrics=m, pathologies=",".join(flags), wall_s=wall_s / len(jobs), env=env,
                                 curves=_rows(curves, k * n_log, k * n_log + n),
                                 layers=_rows(layers, k * n_log * rows, (k * n_log + n) * rows),
                                 modules=modules.copy()))
    return results
