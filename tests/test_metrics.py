"""Metrics on hand-made curves with known answers; seed statistics on synthetic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench import metrics
from bench.schema import KINDS, STATS
from bench.spec import MetricsConfig
from bench.train.stacked import trace_rows

CFG = MetricsConfig()


def layer_stats(depth: int = 3, n_log: int = 2, grad=(1.0, 1.0, 1.0), act_std=(1.0, 1.0),
                dead=(0.0, 0.0), norm=(1.0, 1.0, 1.0), final_norm=None) -> np.ndarray:
    s = np.full((n_log, depth, len(KINDS), len(STATS)), np.nan)
    w, a = KINDS.index("weight"), KINDS.index("act")
    for t in range(n_log):
        s[t, :, w, STATS.index("grad_norm")] = grad
        s[t, :, w, STATS.index("norm")] = norm if (t == 0 or final_norm is None) else final_norm
        s[t, : depth - 1, a, STATS.index("std")] = act_std
        s[t, : depth - 1, a, STATS.index("dead_frac")] = dead
    return s


def run(loss, stats=None, diverged_at=-1, total=None, cfg=CFG):
    loss = np.asarray(loss, dtype=float)
    steps = np.arange(len(loss)) * 10
    val = loss * 1.1
    stats = layer_stats(n_log=len(loss)) if stats is None else stats
    params, rows = as_rows(stats)
    return metrics.job_metrics(steps, loss, val, np.full(len(loss), np.nan), params, rows,
                               diverged_at, total or int(steps[-1]), cfg)


def as_rows(stats: np.ndarray) -> tuple[list[str], np.ndarray]:
    """An MLP's (n_log, depth, kinds, stats) array as trace rows: (params, (n_log, rows, stats))."""
    rows, picks = trace_rows(stats.shape[1])
    return [r.param for r in rows], stats.reshape(len(stats), -1, len(STATS))[:, picks]


def test_window_means():
    losses = np.arange(21, dtype=float)  # step s has loss s
    out = metrics.window_means(losses, np.array([0, 10, 20]), 10)
    np.testing.assert_allclose(out, [0.0, np.mean(range(1, 11)), np.mean(range(11, 21))])


def test_steps_to_target_first_crossing_and_never():
    m = run([1.0, 0.5, 0.2, 0.09, 0.05])
    assert m["steps_to_target"] == 30  # 0.09 <= 0.1 x 1.0 at the fourth logged step
    assert np.isnan(run([1.0, 0.5, 0.2, 0.15])["steps_to_target"])
    absolute = MetricsConfig(target_loss=0.3)
    assert run([1.0, 0.5, 0.2], cfg=absolute)["steps_to_target"] == 20


def test_final_best_and_auc():
    m = run([2.0, 1.0, 1.0, 0.5, 1.5])
    assert m["final_loss"] == 1.5 and m["best_loss"] == 0.5
    # Normalized curve 1, .5, .5, .25, .75 on x = 0, .25, .5, .75, 1: trapezoid area.
    assert m["loss_auc"] == pytest.approx(0.25 * (0.75 + 0.5 + 0.375 + 0.5))
    assert run([1.0, 1.0, 1.0])["loss_auc"] == pytest.approx(1.0)


def test_spikes_count_rising_edges():
    assert metrics.n_spikes(np.array([1.0, 0.5, 1.2, 1.3, 0.4, 0.3, 0.9, 0.2]), 2.0) == 2
    assert metrics.n_spikes(np.array([1.0, 0.9, 0.8]), 2.0) == 0


def test_diverged_job_has_no_final_values():
    m = run([1.0, 0.8], diverged_at=15)
    assert m["diverged_at"] == 15 and np.isnan(m["final_loss"]) and np.isnan(m["loss_auc"])
    assert "diverged" in metrics.pathologies(m, CFG)


def test_gradient_ratio_and_flags():
    vanishing = run([1.0, 0.05], layer_stats(grad=(1e-4, 1e-2, 1.0)))
    assert vanishing["grad_ratio_init"] == pytest.approx(1e-4)
    assert metrics.pathologies(vanishing, CFG) == ["vanishing_gradients"]
    exploding = run([1.0, 0.05], layer_stats(grad=(500.0, 10.0, 1.0)))
    assert metrics.pathologies(exploding, CFG) == ["exploding_gradients"]
    zero = run([1.0, 0.95], layer_stats(grad=(0.0, 0.0, 0.0)))  # all-zero init: 0/0
    assert np.isnan(zero["grad_ratio_init"])
    assert metrics.pathologies(zero, CFG) == ["vanishing_gradients", "stalled"]


def test_activation_ratio_dead_units_and_weight_growth():
    m = run([1.0, 0.05], layer_stats(depth=4, grad=(1, 1, 1, 1), act_std=(2.0, 1.0, 0.5),
                                     dead=(0.0, 0.5, 0.9), norm=(1, 1, 1, 1), final_norm=(30, 0, 0, 0)))
    assert m["act_ratio_init"] == pytest.approx(0.25 / 4.0)
    assert m["dead_frac_init"] == pytest.approx(1.4 / 3)
    assert m["weight_growth"] == pytest.approx(30 / 2)
    assert metrics.pathologies(m, CFG) == ["exploding_weights"]
    dead = run([1.0, 0.05], layer_stats(dead=(0.8, 0.9)))
    assert metrics.pathologies(dead, CFG) == ["dead_units"]


def test_stalled_means_never_below_90_percent_of_initial():
    assert "stalled" in metrics.pathologies(run([1.0, 0.95, 0.92]), CFG)
    assert "stalled" not in metrics.pathologies(run([1.0, 0.8, 0.7]), CFG)


def test_bootstrap_ci_covers_a_known_mean():
    rng = np.random.default_rng(1)
    hits = 0
    reps = 400
    for i in range(reps):
        low, high = metrics.bootstrap_ci(rng.normal(5.0, 2.0, size=30), n_boot=1000, seed=i)
        hits += low <= 5.0 <= high
    # Percentile bootstrap of a mean at n = 30 is slightly liberal; 95% nominal.
    assert 0.90 <= hits / reps <= 0.98


def test_summarize_groups_and_success_rate():
    runs = pd.DataFrame({"init": ["a"] * 4 + ["b"] * 4, "seed": [0, 1, 2, 3] * 2,
                         "status": ["ok"] * 7 + ["diverged"],
                         "steps_to_target": [10, 20, 30, 40, 50, np.nan, np.nan, np.nan],
                         "final_loss": np.arange(8.0), "loss_auc": np.ones(8), "final_val_loss": np.ones(8),
                         "final_val_acc": np.full(8, np.nan)})
    out = metrics.summarize(runs, by=["init"]).set_index("init")
    assert out.loc["a", "success_rate"] == 1.0 and out.loc["b", "success_rate"] == 0.25
    assert out.loc["a", "steps_to_target_median"] == 25 and out.loc["b", "n_ok"] == 3
    assert out.loc["a", "steps_to_target_ci_low"] <= 25 <= out.loc["a", "steps_to_target_ci_high"]


def test_seeds_needed_recovers_a_planted_noise_level():
    rng = np.random.default_rng(0)
    # 20 cells per init, 10 seeds each; cell means differ, seed noise sd = 10 around a mean ~ 100.
    rows = [{"init": init, "cell": c, "steps_to_target": 100 + 5 * c + rng.normal(0, sd)}
            for init, sd in (("calm", 10.0), ("noisy", 40.0)) for c in range(20) for _ in range(10)]
    out = metrics.seeds_needed(pd.DataFrame(rows), ["cell"]).set_index("init")
    assert out.loc["calm", "seed_sd"] == pytest.approx(10, rel=0.1)
    assert out.loc["noisy", "seed_sd"] == pytest.approx(40, rel=0.1)
    # (2 x 1.96 x 10 / (0.1 x 147.5))^2 ~= 7 seeds for a CI 10% of the mean wide; 16x that when 4x noisier.
    assert 5 <= out.loc["calm", "seeds_for_0.1"] <= 10
    assert out.loc["noisy", "seeds_for_0.1"] == pytest.approx(16 * out.loc["calm", "seeds_for_0.1"], rel=0.3)
