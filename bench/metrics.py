"""Curves to metrics, pathology flags, and seed aggregation with confidence intervals.

Every metric is defined here once (and in the README's "Metrics" table):

- ``train_loss`` curve: at each logged step s, the mean minibatch loss over the
  window (s - log_every, s]; at step 0 the step-0 loss. Its step-0 value is the
  *initial loss*.
- ``steps_to_target``: first logged step whose train_loss <= target, where the
  target is ``target_loss`` if set, else ``target_ratio`` x initial loss. NaN if
  never (resolution: ``log_every``).
- ``final_loss`` / ``final_val_loss`` / ``final_val_acc``: values at the last
  logged step; NaN for diverged jobs. ``best_loss``: lowest logged train_loss.
- ``loss_auc``: area under train_loss / initial loss over training time scaled
  to [0, 1] (trapezoid); 1 = never improved, lower = faster. NaN if diverged.
- ``diverged_at``: step where the minibatch loss was non-finite or above
  ``divergence_ratio`` x the step-0 loss (NaN if never).
- ``n_spikes``: times the logged train_loss rose above ``spike_ratio`` x its
  lowest value so far (rising edges).
- ``grad_ratio_init``: first-layer over last-layer weight-gradient norm at step 0.
- ``act_ratio_init``: variance of the last hidden layer's activations over the
  first hidden layer's at step 0 (1 with one hidden layer, NaN with none). A model with no
  activation modules (its nonlinearity a function call, ``F.relu``) has it over the outputs of
  its weight-holding modules but the last (the head): the same growth or decay, measured before
  the nonlinearity.
- ``dead_frac_init`` / ``dead_frac_final``: fraction of hidden units whose output
  is zero for every sample of the probe batch, at step 0 / the last logged step.
- ``symmetric_frac_init`` / ``symmetric_frac_final``: fraction of hidden units that are
  copies of another unit of their layer (same incoming weights and bias, see
  ``bench.train.probes.distinct_frac``), at step 0 / the last logged step.
- ``null_loss``: training loss of the best predictor that ignores its input (the
  targets' mean for regression, the class frequencies for classification).
- ``weight_growth``: norm of all weights at the last logged step over step 0
  (NaN when the initial weights are all zero).
- ``signal_error``: median over the predicted rows of |log(measured / predicted)| second
  moment at step 0: an MLP's preactivations (mean-field theory) or a residual MLP's stem,
  stream after each block and head (the stream recursion); NaN elsewhere (bench.theory).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bench.schema import STATS
from bench.settings import MetricsConfig

METRICS = ("steps_to_target", "final_loss", "best_loss", "loss_auc", "final_val_loss", "final_val_acc",
           "diverged_at", "n_spikes", "grad_ratio_init", "act_ratio_init", "dead_frac_init",
           "dead_frac_final", "symmetric_frac_init", "symmetric_frac_final", "weight_growth",
           "null_loss", "signal_error")
# Per-job numbers stored beside METRICS that the flags are computed from (not shown as metrics).
INTERNAL = ("initial_loss", "first_grad_init", "act_overflow_init", "zero_head_init")
PATHOLOGIES = ("vanishing_gradients", "exploding_gradients", "vanishing_activations", "exploding_activations",
               "exploding_weights", "dead_units", "symmetric_units", "stalled", "diverged")


def window_means(losses: np.ndarray, log_steps: np.ndarray, log_every: int) -> np.ndarray:
    """Mean minibatch loss over (s - log_every, s] for each logged step s.

    NaN entries (steps after a job diverged) are skipped; an infinite loss is kept, so a window
    holding the step a job overflowed at (step 0 itself, for a net that explodes at its start)
    reads inf, not the mean of the steps before it.
    """
    out = np.full(len(log_steps), np.nan)
    for i, s in enumerate(log_steps):
        window = losses[max(0, s - log_every + 1): s + 1]
        window = window[~np.isnan(window)]
        if len(window):
            out[i] = window.mean()
    return out


def steps_to_target(steps: np.ndarray, loss: np.ndarray, target: float) -> float:
    """First step whose loss <= target; NaN if never."""
    hit = np.flatnonzero(np.isfinite(loss) & (loss <= target))
    return float(steps[hit[0]]) if len(hit) else float("nan")


def loss_auc(steps: np.ndarray, loss: np.ndarray, total_steps: int) -> float:
    """Area under loss / loss[0] over steps / total_steps (trapezoid)."""
    if len(steps) < 2 or not np.isfinite(loss).all() or loss[0] <= 0:
        return float("nan")
    return float(np.trapezoid(loss / loss[0], steps / total_steps))


def n_spikes(loss: np.ndarray, ratio: float) -> int:
    """Rising edges of loss above ``ratio`` x its running minimum (over earlier points)."""
    count, above = 0, False
    best = np.inf
    for value in loss:
        if not np.isfinite(value):
            break
        now = value > ratio * best
        count += int(now and not above)
        above = now
        best = min(best, value)
    return count


def signal_error(measured: np.ndarray, predicted: np.ndarray) -> float:
    """Median over layers of |log(measured / predicted)| second moments; NaN where undefined (zeros)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(np.log(np.asarray(measured, float) / np.asarray(predicted, float)))
    err = err[np.isfinite(err)]
    return float(np.median(err)) if len(err) else float("nan")


def _ratio(num: float, den: float) -> float:
    num, den = float(num), float(den)
    if np.isnan(num) or np.isnan(den):  # an unmeasured or non-finite side: no ratio
        return float("nan")
    if den > 0:
        return num / den
    return float("nan") if num == 0 else float("inf")


def job_metrics(log_steps: np.ndarray, train_loss: np.ndarray, val_loss: np.ndarray, val_acc: np.ndarray,
                params: list[str], stats: np.ndarray, diverged_at: int, total_steps: int,
                cfg: MetricsConfig, null_loss: float = float("nan"),
                hidden_outputs: Sequence[int] = ()) -> dict[str, float]:
    """All metrics of one job from its logged curves and its layer trace.

    Args:
        params: what each trace row describes (``weight``, ``bias``, ``act``, ...), rows in the
            forward order of their modules (``bench.train.bundle.TraceRow.param``).
        stats: (n_log, rows, len(STATS)): the rows' statistics at each logged step.
        null_loss: the null model's training loss (``TaskData.null_loss``).
        hidden_outputs: the rows of the outputs of the parameter-holding modules but the head, in
            forward order: the activation ratio's rows when the model has no ``act`` rows.

    Curves passed here end at the step the job diverged at (kept when logged: the state it
    diverged from). Gradient ratios read the ``weight`` rows (first over last parameter-holding
    module), activation ratios and dead units the ``act`` rows (post-activations in forward order).
    """
    params = np.asarray(params)
    w, a = np.flatnonzero(params == "weight"), np.flatnonzero(params == "act")
    dead_rows = a
    if not len(a):  # no activation module (F.relu in a forward): the hidden modules' outputs, not the head's
        a = np.asarray(hidden_outputs, dtype=int)
    std, norm, grad = STATS.index("std"), STATS.index("norm"), STATS.index("grad_norm")
    dead, distinct = STATS.index("dead_frac"), STATS.index("distinct_frac")
    diverged = diverged_at >= 0
    initial = train_loss[0] if len(train_loss) else float("nan")
    target = cfg.target_loss if cfg.target_loss is not None else cfg.target_ratio * initial
    m: dict[str, float] = {
        "steps_to_target": steps_to_target(log_steps, train_loss, target),
        "final_loss": float("nan") if diverged else float(train_loss[-1]),
        "best_loss": float(np.nanmin(train_loss)) if np.isfinite(train_loss).any() else float("nan"),
        "loss_auc": float("nan") if diverged else loss_auc(log_steps, train_loss, total_steps),
        "final_val_loss": float("nan") if diverged else float(val_loss[-1]),
        "final_val_acc": float("nan") if diverged else float(val_acc[-1]),
        "diverged_at": float(diverged_at) if diverged else float("nan"),
        "n_spikes": float(n_spikes(train_loss, cfg.spike_ratio)),
        "initial_loss": float(initial),
    }
    s0, s1 = stats[0], stats[-1]
    nan = float("nan")
    m["grad_ratio_init"] = _ratio(s0[w[0], grad], s0[w[-1], grad]) if len(w) else nan
    m["act_ratio_init"] = _ratio(float(s0[a[-1], std]) ** 2, float(s0[a[0], std]) ** 2) if len(a) else nan
    m["dead_frac_init"] = float(np.mean(s0[dead_rows, dead])) if len(dead_rows) else nan
    m["dead_frac_final"] = float(np.mean(s1[dead_rows, dead])) if len(dead_rows) else nan
    m["symmetric_frac_init"] = 1 - _mean_measured(s0[w, distinct])
    m["symmetric_frac_final"] = 1 - _mean_measured(s1[w, distinct])
    # A post-activation that is no longer a finite number at step 0 has exploded past float32.
    m["act_overflow_init"] = float(len(a) > 0 and not np.isfinite(s0[a, std]).all())
    m["null_loss"] = float(null_loss)
    w0, w1 = np.sqrt(np.sum(s0[w, norm] ** 2)), np.sqrt(np.sum(s1[w, norm] ** 2))
    m["weight_growth"] = float(w1 / w0) if w0 > 0 else nan
    m["first_grad_init"] = float(s0[w[0], grad]) if len(w) else nan
    # A zero-initialized output layer (Fixup, a zero head) passes no gradient below it at step 0, by
    # design: the gradient ratio at step 0 then says nothing about how signal flows.
    m["zero_head_init"] = float(len(w) > 1 and s0[w[-1], norm] == 0 and np.nansum(s0[w[:-1], norm]) > 0)
    return m


def _mean_measured(values: np.ndarray) -> float:
    """Mean of a per-layer share over the layers that measured it (NaN if none did)."""
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def pathologies(m: dict[str, float], cfg: MetricsConfig) -> list[str]:
    """The pathology flags a job's metrics raise (thresholds from ``[metrics]``; see README)."""
    flags = []
    ratio = m["grad_ratio_init"]
    if not m.get("zero_head_init", 0.0) and (
            m["first_grad_init"] == 0 or (np.isfinite(ratio) and ratio < cfg.vanishing_ratio)):
        flags.append("vanishing_gradients")
    if ratio > cfg.exploding_ratio:
        flags.append("exploding_gradients")
    act = m["act_ratio_init"]
    if np.isfinite(act) and act < cfg.vanishing_act_ratio:
        flags.append("vanishing_activations")
    if act > cfg.exploding_act_ratio or m.get("act_overflow_init", 0.0) > 0:
        flags.append("exploding_activations")
    if m["weight_growth"] > cfg.weight_growth_max:
        flags.append("exploding_weights")
    if max(np.nan_to_num(m["dead_frac_init"]), np.nan_to_num(m["dead_frac_final"])) > cfg.dead_max:
        flags.append("dead_units")
    if m.get("symmetric_frac_final", np.nan) > cfg.symmetric_max:
        flags.append("symmetric_units")
    # Progress is measured from the better of the start and the null model: learning the output
    # bias alone takes a net from its initial loss to the null loss, and that is not learning.
    reference = np.nanmin([m["initial_loss"], m.get("null_loss", np.nan)])
    if np.isnan(m["diverged_at"]) and np.isnan(m["steps_to_target"]) and \
            m["best_loss"] > cfg.stall_ratio * reference:
        flags.append("stalled")
    if np.isfinite(m["diverged_at"]):
        flags.append("diverged")
    return flags


# --- seed aggregation ------------------------------------------------------------
def bootstrap_ci(values: np.ndarray, *, level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (NaNs dropped); NaNs if fewer than 2 values."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


SUMMARY_METRICS = ("steps_to_target", "final_loss", "loss_auc", "final_val_loss", "final_val_acc")


def summarize(results, by: list[str] | None = None, metrics: tuple[str, ...] = SUMMARY_METRICS,
              level: float = 0.95) -> pd.DataFrame:
    """Aggregate runs over seeds: per group n, success rate, and per metric mean, median, CI.

    Args:
        results: what :func:`bench.load` returns, or a runs DataFrame.
        by: grouping columns; default every setting that varies in the sweep except ``seed``.
        metrics: metric columns to aggregate.
        level: confidence level of the percentile bootstrap CI of the mean.

    Returns:
        One row per group: ``n``, ``n_ok``, ``success_rate`` (share of runs that reached
        the target), and ``<metric>_mean``, ``_median``, ``_ci_low``, ``_ci_high``.
    """
    runs = results if isinstance(results, pd.DataFrame) else results.runs
    if by is None:
        by = [c for c in getattr(results, "axes", []) if c != "seed"] or ["init"]
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in by if c not in runs.columns]
    if missing:
        # A list as long as the table that names no columns would be taken by pandas as group labels.
        raise KeyError(f"summarize: no column {missing} in the runs table; group by settings such as "
                       f"{[c for c in getattr(results, 'axes', []) if c != 'seed'] or ['init']}")
    rows = []
    for key, group in runs.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["n"] = len(group)
        row["n_ok"] = int((group["status"] == "ok").sum())
        row["success_rate"] = float(group["steps_to_target"].notna().mean())
        for metric in metrics:
            values = group[metric].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            low, high = bootstrap_ci(finite, level=level)
            row[f"{metric}_mean"] = float(finite.mean()) if len(finite) else float("nan")
            row[f"{metric}_median"] = float(np.median(finite)) if len(finite) else float("nan")
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = low, high
        rows.append(row)
    return pd.DataFrame(rows)


def seeds_needed(runs: pd.DataFrame, cell_cols: list[str], metric: str = "steps_to_target",
                 widths: tuple[float, ...] = (0.1, 0.25), level: float = 0.95) -> pd.DataFrame:
    """How many seeds a cell needs for a CI of the mean of ``metric`` no wider than a share of it.

    Uses the pooled within-cell standard deviation over seeds (cells = ``cell_cols``, one row
    per seed) per ``init``: the full normal-approximation CI width is 2 z sd / sqrt(n), so
    n = (2 z sd / (w |mean|))^2 for a CI of width ``w`` x the mean.

    Returns:
        One row per init: ``cells`` used, ``mean``, ``seed_sd``, and ``seeds_for_<w>`` per width.
    """
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    rows = []
    finite = runs[np.isfinite(runs[metric].astype(float))]
    for init, g in finite.groupby("init", sort=True):
        groups = [c[metric].to_numpy(float) for _, c in g.groupby(cell_cols, dropna=False)] if cell_cols \
            else [g[metric].to_numpy(float)]
        groups = [v for v in groups if len(v) >= 2]
        if not groups:
            continue
        dof = sum(len(v) - 1 for v in groups)
        sd = float(np.sqrt(sum(((v - v.mean()) ** 2).sum() for v in groups) / dof))
        mean = float(np.mean(np.concatenate(groups)))
        row = {"init": init, "cells": len(groups), "mean": mean, "seed_sd": sd}
        for w in widths:
            need = (2 * z * sd / (w * abs(mean))) ** 2 if mean else np.nan
            row[f"seeds_for_{w:g}"] = max(2, int(np.ceil(need))) if np.isfinite(need) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
