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
from bench.schema import CURVE_COLUMNS, KINDS, LAYER_COLUMNS, STATS, STATUSES
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

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")


def failed(job: Job, error: str, env: dict[str, str], wall_s: float = float("nan")) -> JobResult:
    """The row of a job that raised: every metric NaN, the error kept."""
    return JobResult(job.job_id, job.settings(), "failed", error=error,
                     metrics={name: float("nan") for name in metrics.METRICS}, wall_s=wall_s, env=env)


_Q, _Q_PRED = len(STATS), len(STATS) + 1  # where q and q_pred follow the stats in a trace row


def _predicted_q(job: Job, dims: list[int], q0: float) -> np.ndarray:
    """Mean-field prediction of each layer's preactivation second moment at step 0 (NaN if none).

    None for a job with init rules: theory knows the scheme, not what the rules changed after it.
    """
    if job.init_rules:
        return np.full(len(dims) - 1, np.nan)
    try:
        return theory.predicted_preact_variance(job.init, job.activation, dims, q0,
                                                params=dict(job.init_params), init_bias=job.init_bias)
    except (UserError, ValueError, ArithmeticError):
        return np.full(len(dims) - 1, np.nan)


def _trace_rows(depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One logged step's rows of a layer trace: (layer, param code, index into depth x KINDS).

    Every (layer, param) pair but the output layer's ``act``: it has no post-activation.
    """
    layer = np.repeat(np.arange(depth, dtype=np.int32), len(KINDS))
    code = np.tile(np.arange(len(KINDS), dtype=np.int8), depth)
    kept = ~((code == KINDS.index("act")) & (layer == depth - 1))
    return layer[kept], code[kept], np.flatnonzero(kept)


def _traces(out: BundleOutput, code: np.ndarray, index: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Every job's layer-trace values: (K, n_log, rows per step, STATS + q + q_pred), float64.

    Job-major, so that each job's rows are one contiguous run of the bundle's table. ``q`` is the
    measured second moment (mean^2 + std^2) of activations and preactivations, NaN for weights and
    biases; ``q_pred`` is theory's prediction (``predicted``, (K, depth)) on the step-0 preactivations.
    Kept in float64 until stored (as float32): a second moment overflows float32 when the std
    passes 1.8e19, which an exploding net's deep layers reach while their entries are finite.
    """
    n_log, k, depth = out.layer_stats.shape[:3]
    block = np.full((k, n_log, len(index), len(STATS) + 2), np.nan)
    stats = out.layer_stats.reshape(n_log, k, depth * len(KINDS), len(STATS))[:, :, index]
    block[..., :len(STATS)] = stats.transpose(1, 0, 2, 3)
    signal = np.isin(code, [KINDS.index("preact"), KINDS.index("act")])
    mean, std = block[:, :, signal, STATS.index("mean")], block[:, :, signal, STATS.index("std")]
    block[:, :, signal, _Q] = mean ** 2 + std ** 2
    preact = code == KINDS.index("preact")  # one row per layer, in layer order
    for i in np.flatnonzero(out.log_steps == 0):
        block[:, i, preact, _Q_PRED] = predicted
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
    n_log, k_jobs, depth = out.layer_stats.shape[:3]
    layer, code, index = _trace_rows(depth)
    rows = len(layer)
    train = np.stack([metrics.window_means(out.losses[:, k], out.log_steps, job.log_every)
                      for k, job in enumerate(jobs)])
    # Signal propagation: measured second moment of each layer's preactivation at step 0 next to
    # mean-field theory's prediction for this scheme, activation and input.
    predicted = np.array([_predicted_q(job, out.dims, float(out.input_q[k])) for k, job in enumerate(jobs)])
    block = _traces(out, code, index, predicted)
    curves = pd.DataFrame({"step": np.tile(out.log_steps, k_jobs), "train_loss": train.ravel(),
                           "val_loss": out.val_loss.T.ravel(), "val_acc": out.val_acc.T.ravel(),
                           "grad_norm": out.grad_norm.T.ravel()})
    # Compact dtypes: 10,000 jobs' traces are tens of millions of rows (float32 stats, int32
    # indices, a categorical param).
    with np.errstate(over="ignore"):  # beyond float32's range (3.4e38) a statistic is stored as inf
        values = block.reshape(-1, block.shape[-1]).astype(np.float32)
    layers = pd.DataFrame({"step": np.tile(np.repeat(out.log_steps.astype(np.int32), rows), k_jobs),
                           "layer": np.tile(layer, k_jobs * n_log),
                           "param": pd.Categorical.from_codes(np.tile(code, k_jobs * n_log),
                                                              categories=list(KINDS)),
                           **dict(zip((*STATS, "q", "q_pred"), values.T))})
    at0, preact = out.log_steps == 0, code == KINDS.index("preact")
    results = []
    for k, job in enumerate(jobs):
        div = int(out.diverged_at[k])
        # Log steps increase, so the steps up to divergence are a prefix of them. The step a job
        # diverges at, when logged, is kept: its record is the state the job diverged from (at
        # step 0, the initialization itself).
        n = int(np.searchsorted(out.log_steps, div, side="right")) if div >= 0 else n_log
        m = metrics.job_metrics(out.log_steps[:n], train[k, :n], out.val_loss[:n, k], out.val_acc[:n, k],
                                out.layer_stats[:n, k], div, job.steps, cfg,
                                null_loss=float(out.null_loss[k]))
        m["signal_error"] = metrics.signal_error(block[k, at0][:, preact, _Q].ravel(), predicted[k])
        flags = metrics.pathologies(m, cfg)
        results.append(JobResult(job.job_id, job.settings(), "diverged" if div >= 0 else "ok",
                                 metrics=m, pathologies=",".join(flags), wall_s=wall_s / len(jobs), env=env,
                                 curves=_rows(curves, k * n_log, k * n_log + n),
                                 layers=_rows(layers, k * n_log * rows, (k * n_log + n) * rows)))
    return results
