"""A job's result: what a worker sends back to the parent, and how a bundle becomes results.

Workers return :class:`JobResult` objects (plain data, picklable, no file
handles); only the parent writes them to the store. A job that raised is a
result too, with ``status = "failed"`` and its error: never a missing row.
"""

from __future__ import annotations

import platform
import socket
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench import metrics
from bench.engine import BundleOutput
from bench.schema import CURVE_COLUMNS, KINDS, LAYER_COLUMNS, STATS, STATUSES
from bench.spec import Job, MetricsConfig


def environment(device: str = "cpu") -> dict[str, str]:
    """Where a result was computed: stored with every row (and in the store's metadata)."""
    import bench

    return {"device": device, "host": socket.gethostname(), "torch_version": torch.__version__,
            "python": platform.python_version(), "initbench": bench.__version__}


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


def _predicted_q(job: Job, dims: list[int], q0: float) -> np.ndarray:
    """Mean-field prediction of each layer's preactivation second moment at step 0 (NaN if none)."""
    from bench import theory
    from bench.errors import UserError

    try:
        return theory.predicted_preact_variance(job.init, job.activation, dims, q0,
                                                params=dict(job.init_params), init_bias=job.init_bias)
    except (UserError, ValueError, ArithmeticError):
        return np.full(len(dims) - 1, np.nan)


def from_bundle(jobs: list[Job], out: BundleOutput, cfg: MetricsConfig, wall_s: float,
                env: dict[str, str]) -> list[JobResult]:
    """Turn a trained bundle's arrays into one :class:`JobResult` per job."""
    results = []
    depth = out.layer_stats.shape[2]
    for k, job in enumerate(jobs):
        div = int(out.diverged_at[k])
        keep = out.log_steps < div if div >= 0 else np.ones(len(out.log_steps), dtype=bool)
        keep[0] = True  # step 0 is always recorded: it is the initialization itself
        steps = out.log_steps[keep]
        train = metrics.window_means(out.losses[:, k], out.log_steps, job.log_every)[keep]
        curves = pd.DataFrame({"step": steps, "train_loss": train, "val_loss": out.val_loss[keep, k],
                               "val_acc": out.val_acc[keep, k], "grad_norm": out.grad_norm[keep, k]})
        stats = out.layer_stats[keep, k]  # (n, depth, kinds, stats)
        n = len(steps)
        # Compact dtypes: 10,000 jobs' traces are tens of millions of rows (float32 stats,
        # int32 indices, a categorical param).
        layers = pd.DataFrame(stats.reshape(-1, len(STATS)).astype(np.float32), columns=list(STATS))
        layers.insert(0, "param", pd.Categorical.from_codes(np.tile(np.arange(len(KINDS)), n * depth),
                                                            categories=list(KINDS)))
        layers.insert(0, "layer", np.tile(np.repeat(np.arange(depth, dtype=np.int32), len(KINDS)), n))
        layers.insert(0, "step", np.repeat(steps.astype(np.int32), depth * len(KINDS)))
        # The output layer has no post-activation; keep only rows that were measured.
        layers = layers[~((layers["param"] == "act") & (layers["layer"] == depth - 1))].reset_index(drop=True)
        # Signal propagation: measured second moment of each layer's preactivation at step 0
        # next to mean-field theory's prediction for this scheme, activation and input.
        pre = layers["param"].isin(["preact", "act"])
        layers["q"] = np.where(pre, layers["mean"] ** 2 + layers["std"] ** 2, np.nan).astype(np.float32)
        predicted = _predicted_q(job, out.dims, float(out.input_q[k]))
        first = (layers["step"] == 0) & (layers["param"] == "preact")
        layers["q_pred"] = np.float32(np.nan)
        layers.loc[first, "q_pred"] = predicted[layers.loc[first, "layer"].to_numpy()].astype(np.float32)
        m = metrics.job_metrics(steps, train, curves["val_loss"].to_numpy(), curves["val_acc"].to_numpy(),
                                stats, div, job.steps, cfg)
        m["signal_error"] = metrics.signal_error(layers.loc[first, "q"].to_numpy(), predicted)
        flags = metrics.pathologies(m, cfg)
        results.append(JobResult(job.job_id, job.settings(), "diverged" if div >= 0 else "ok",
                                 metrics=m, pathologies=",".join(flags), wall_s=wall_s / len(jobs),
                                 env=env, curves=curves, layers=layers))
    return results
