"""bench.record.from_bundle against a plain job-by-job reference, on a synthetic and a trained bundle.

from_bundle builds its tables for the whole bundle at once and slices them per job; the reference
below builds each job's tables on its own, with pandas filters, the way the tables are defined.
Both must agree exactly: values, dtypes, columns and index.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from bench import metrics, record, spec, theory
from bench.errors import UserError
from bench.schema import CURVE_COLUMNS, KINDS, LAYER_COLUMNS, STATS
from bench.train import stacked as engine
from bench.train.bundle import BundleOutput

SPEC = """
[grid]
init = ["default", "kaiming_normal", "lsuv", "zeros", "mean_field", "scaled_normal"]
seed = [0]
[model]
depth = 3
width = 8
activation = "tanh"
[task]
name = "teacher"
n_train = 64
n_val = 32
[train]
steps = 40
batch_size = 16
log_every = 10
"""


def reference(job, k: int, out: BundleOutput, cfg) -> record.JobResult:
    """One job's result built on its own, row filter by row filter, from the MLP's probe array."""
    array = engine.layer_array(out)  # (n_log, K, depth, kinds, stats)
    depth = array.shape[2]
    div = int(out.diverged_at[k])
    # Up to and including the step the job diverged at: the state it diverged from.
    keep = out.log_steps <= div if div >= 0 else np.ones(len(out.log_steps), dtype=bool)
    steps = out.log_steps[keep]
    train = metrics.window_means(out.losses[:, k], out.log_steps, job.log_every)[keep]
    curves = pd.DataFrame({"step": steps, "train_loss": train, "val_loss": out.val_loss[keep, k],
                           "val_acc": out.val_acc[keep, k], "grad_norm": out.grad_norm[keep, k]})
    stats = array[keep, k]
    n = len(steps)
    layer = np.tile(np.repeat(np.arange(depth), len(KINDS)), n)
    kind = np.tile(np.arange(len(KINDS)), n * depth)
    kept = ~((kind == KINDS.index("act")) & (layer == depth - 1))  # the output layer has no activation
    values = stats.reshape(-1, len(STATS))[kept]
    # nn.Sequential numbering: linear layer i is module 2i, its activation module 2i + 1.
    module = 2 * layer[kept] + (kind[kept] == KINDS.index("act"))
    params = np.array(KINDS)[kind[kept]]
    layers = pd.DataFrame(values.astype(np.float32), columns=list(STATS))
    layers.insert(0, "param", pd.Categorical(params, categories=sorted(set(KINDS))))
    layers.insert(0, "index", module.astype(np.int32))
    layers.insert(0, "layer", pd.Categorical(module.astype(str), categories=sorted({str(m) for m in module})))
    layers.insert(0, "step", np.repeat(steps.astype(np.int32), kept.sum() // n))
    signal = np.isin(params, ["preact", "act"])
    q = values[:, STATS.index("mean")].astype(float) ** 2 + values[:, STATS.index("std")].astype(float) ** 2
    layers["q"] = np.where(signal, q, np.nan).astype(np.float32)
    try:
        predicted = theory.predicted_preact_variance(job.init, job.activation, out.dims,
                                                     float(out.input_q[k]), params=dict(job.init_params),
                                                     init_bias=job.init_bias)
    except UserError:
        predicted = np.full(depth, np.nan)
    first = ((layers["step"] == 0) & (layers["param"] == "preact")).to_numpy()
    layers["q_pred"] = np.float32(np.nan)
    layers.loc[first, "q_pred"] = predicted[module[first] // 2].astype(np.float32)
    rows = [r.param for r in engine.trace_rows(depth)[0]]
    m = metrics.job_metrics(steps, train, curves["val_loss"].to_numpy(), curves["val_acc"].to_numpy(),
                            rows, out.row_stats[keep, k], div, job.steps, cfg,
                            null_loss=float(out.null_loss[k]))
    m["signal_error"] = metrics.signal_error(q[first], predicted)
    return record.JobResult(job.job_id, job.settings(), "diverged" if div >= 0 else "ok", metrics=m,
                            pathologies=",".join(metrics.pathologies(m, cfg)), env={}, curves=curves,
                            layers=layers)


def assert_same(got: list[record.JobResult], want: list[record.JobResult]) -> None:
    assert [r.job_id for r in got] == [r.job_id for r in want]
    for g, w in zip(got, want):
        assert (g.status, g.pathologies, g.settings) == (w.status, w.pathologies, w.settings), g.job_id
        assert list(g.metrics) == list(w.metrics)
        np.testing.assert_array_equal(list(g.metrics.values()), list(w.metrics.values()), err_msg=g.job_id)
        assert list(g.curves.columns) == list(CURVE_COLUMNS) and list(g.layers.columns) == list(LAYER_COLUMNS)
        pd.testing.assert_frame_equal(g.curves, w.curves, check_exact=True)
        pd.testing.assert_frame_equal(g.layers, w.layers, check_exact=True)


@pytest.fixture(scope="module")
def sweep() -> spec.Spec:
    return spec.parse(SPEC)


def synthetic(jobs, rng: np.random.Generator) -> BundleOutput:
    """A bundle of the engine's shapes and dtypes, random values, divergence at edge-case steps."""
    k, job = len(jobs), jobs[0]
    log_steps = np.arange(0, job.steps + 1, job.log_every)
    losses = rng.uniform(0.1, 2.0, (job.steps + 1, k)).astype(np.float32)
    diverged_at = np.array([-1, 0, 7, 10, 25, 40][:k])
    for j, step in enumerate(diverged_at):
        if step >= 0:
            losses[step:, j] = np.nan  # nothing is trained after divergence
    rows, _ = engine.trace_rows(job.depth)
    stats = rng.normal(size=(len(log_steps), k, len(rows), len(STATS)))
    stats[:, :, [r.param in ("weight", "bias") for r in rows], STATS.index("dead_frac")] = np.nan
    return BundleOutput(log_steps=log_steps, losses=losses, val_loss=losses[log_steps] * 1.1,
                        val_acc=rng.random((len(log_steps), k), dtype=np.float32),
                        grad_norm=rng.random((len(log_steps), k), dtype=np.float32), rows=rows,
                        row_stats=stats, modules=[], diverged_at=diverged_at, init_loss=losses[0].copy(),
                        input_q=rng.uniform(0.5, 1.5, k).astype(np.float32), dims=[5, 8, 8, 3],
                        null_loss=rng.uniform(0.5, 1.5, k))


def test_synthetic_bundle_matches_reference(sweep: spec.Spec) -> None:
    jobs = sweep.jobs()
    # A parameter theory rejects: that job's prediction (and signal_error) is NaN, the rest unaffected.
    jobs[-1] = dataclasses.replace(jobs[-1], init_params=(("std", "wide"),))
    out = synthetic(jobs, np.random.default_rng(0))
    got = record.from_bundle(jobs, out, sweep.metrics, 6.0, {})
    assert_same(got, [reference(job, k, out, sweep.metrics) for k, job in enumerate(jobs)])
    assert [r.status for r in got] == ["ok"] + ["diverged"] * 5
    # step 0, then the steps up to divergence: a logged step it diverged at is its last record
    assert [len(r.curves) for r in got] == [5, 1, 1, 2, 3, 5]
    assert np.isnan(got[-1].metrics["signal_error"]) and got[-1].layers["q_pred"].isna().all()
    assert all(r.wall_s == 1.0 for r in got)


def test_trained_bundle_matches_reference(sweep: spec.Spec) -> None:
    jobs = sweep.jobs()
    out = engine.train(jobs, divergence_ratio=sweep.metrics.divergence_ratio)
    assert_same(record.from_bundle(jobs, out, sweep.metrics, 1.0, {}),
                [reference(job, k, out, sweep.metrics) for k, job in enumerate(jobs)])


def test_tables_are_each_jobs_own(sweep: spec.Spec) -> None:
    jobs = sweep.jobs()[:2]
    a, b = record.from_bundle(jobs, synthetic(jobs, np.random.default_rng(1)), sweep.metrics, 1.0, {})
    before = b.layers.copy()
    a.layers.loc[:, "mean"] = 0.0
    pd.testing.assert_frame_equal(b.layers, before)
    assert list(a.layers.index) == list(range(len(a.layers)))
