"""Diagnoses practitioners' init problems get right (issue 11), each fault's whole kind.

Every case a user reported is here with the right value, next to its siblings (other
activations, depths, tasks and outcomes): a net that explodes at step 0, a scheme parameter
as a grid axis, units that stay copies of each other, a stall hidden by the output bias, and
the documented behaviour of the GELU gain. Sweeps run in-process through ``bench.sweep.main``
(the process boundary is not the point here); plain PyTorch is the reference where one exists.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bench
from bench import metrics, regress, runner, spec, sweep, theory
from bench.schema import axis_column
from bench.spec import MetricsConfig
from bench.store import Results
from bench.train import bundle, probes, tasks
from bench.train import stacked as engine
from tests.test_metrics import as_rows

# Among the longest files: run first (see tests/conftest.py).
pytestmark = pytest.mark.slow

OVERFLOW = """
name = "overflow"
[grid]
init = ["scaled_normal"]
[init_params.scaled_normal]
std = 1.0
[model]
depth = 20
width = 256
activation = "linear"
[task]
name = "teacher"
n_train = 256
[train]
steps = 10
batch_size = 64
log_every = 5
"""

ZERO_INIT = """
name = "zero_init"
[grid]
init = ["zeros"]
init_bias = ["auto", 0.1]
depth = [3]
seed = [0]
[model]
width = 32
activation = "relu"
[task]
name = "teacher"
n_train = 512
[train]
steps = 300
lr = 0.05
batch_size = 64
log_every = 20
"""


def _sweep(tmp: Path, text: str, name: str = "spec", expect: int = 0) -> Results:
    path = tmp / f"{name}.toml"
    path.write_text(text)
    out = tmp / name
    assert sweep.main([str(path), "--out", str(out), "--quiet", "--jobs", "1"]) == expect
    assert (out / "report.html").is_file(), "the report must build whatever the outcome"
    return bench.load(out)


def _flags(row: pd.Series) -> set[str]:
    return set(filter(None, row["pathologies"].split(",")))


# --- 1. a net that explodes at step 0 ----------------------------------------------------------
@pytest.fixture(scope="module")
def overflow(tmp_path_factory) -> Results:
    return _sweep(tmp_path_factory.mktemp("overflow"), OVERFLOW, "overflow")


def _plain_step0(text: str) -> tuple[torch.nn.Sequential, torch.Tensor]:
    """The job's model as PyTorch builds it, and its first training batch."""
    job = spec.parse(text).jobs()[0]
    data = tasks.load(job.task, job.task_params, job.seed)
    first = tasks.batch_schedule(job.seed, len(data.x_train), job.batch_size, 0)[0]
    return bundle.build_model(job, data), data.x_train[first]


def test_step0_overflow_is_exploding_activations_not_vanishing_gradients(overflow):
    run = overflow.runs.iloc[0]
    assert run["status"] == "diverged" and run["diverged_at"] == 0
    # Its loss is not finite, so neither are its gradients: no gradient ratio to judge.
    assert np.isnan(run["grad_ratio_init"])
    assert _flags(run) == {"exploding_activations", "diverged"}
    assert run["act_ratio_init"] > 1e30  # 16x per layer in std over 18 layers: 256^18 in variance


def test_step0_record_is_the_initialization_not_the_retirement(overflow):
    model, x = _plain_step0(OVERFLOW)
    step0 = overflow.layers[overflow.layers["step"] == 0]
    w = step0[step0["param"] == "weight"].sort_values("index")
    norms = [lin.weight.norm().item() for lin in model if isinstance(lin, torch.nn.Linear)]
    np.testing.assert_allclose(w["norm"].to_numpy(), norms, rtol=1e-5)
    assert norms[0] == pytest.approx(64, rel=0.05) and np.median(norms[1:]) == pytest.approx(256, rel=0.05)
    # Plain float32 PyTorch's preactivations: finite, ~16x per layer; ours must say the same.
    with torch.no_grad():
        plain, h = [], x
        for lin in (m for m in model if isinstance(m, torch.nn.Linear)):
            h = lin(h)
            plain.append(h.double().std().item())
    pre = step0[step0["param"] == "preact"].sort_values("index")["std"].to_numpy()
    assert np.isfinite(plain).all() and np.isfinite(pre).all()
    np.testing.assert_allclose(pre, plain, rtol=1e-3)
    growth = pre[1:] / pre[:-1]
    assert np.all((growth > 12) & (growth < 20)), growth
    # The validation pass ran on the initialization (a non-finite loss), not on a zeroed network.
    curve = overflow.curves
    assert len(curve) == 1 and not np.isfinite(curve["val_loss"].iloc[0])
    assert not np.isfinite(curve["train_loss"].iloc[0])


def test_probe_statistics_stay_finite_where_float32_sums_overflow():
    big = torch.full((2, 64, 256), 1.7e18)
    big[1] *= -1
    got = probes.stats(big)
    assert not torch.isfinite(got).all()  # the float32 norm overflows ...
    wide = probes.stats(big, torch.float64)  # ... the float64 one does not
    assert torch.isfinite(wide).all()
    np.testing.assert_allclose(wide[:, 0], [1.7e18, -1.7e18], rtol=1e-6)
    np.testing.assert_allclose(wide[:, 3], 1.7e18 * math.sqrt(64 * 256), rtol=1e-6)


@pytest.mark.parametrize("activation,depth", [("relu", 12), ("tanh", 12), ("linear", 6), ("relu", 30)])
def test_exploding_start_siblings(tmp_path, activation, depth):
    """Other activations and depths with N(0, 1) weights: exploding wherever the signal grows."""
    text = (OVERFLOW.replace('activation = "linear"', f'activation = "{activation}"')
            .replace("depth = 20", f"depth = {depth}").replace("width = 256", "width = 64"))
    run = _sweep(tmp_path, text).runs.iloc[0]
    flags = _flags(run)
    assert "vanishing_gradients" not in flags
    if activation == "tanh":  # tanh is bounded: its outputs saturate at +-1, nothing explodes
        assert "exploding_activations" not in flags
        assert run["act_ratio_init"] == pytest.approx(1.0, rel=0.2)
    else:
        assert "exploding_activations" in flags


def test_vanishing_activations_and_a_healthy_start(tmp_path):
    text = (OVERFLOW.replace("std = 1.0", "std = 0.01")
            .replace('activation = "linear"', 'activation = "tanh"')
            .replace("depth = 20", "depth = 8").replace("width = 256", "width = 64"))
    small = _sweep(tmp_path, text, "small").runs.iloc[0]
    assert "vanishing_activations" in _flags(small) and small["act_ratio_init"] < 1e-4
    healthy = text.replace('init = ["scaled_normal"]', 'init = ["kaiming_normal", "default", "orthogonal"]') \
        .replace('activation = "tanh"', 'activation = "relu"')
    for _, run in _sweep(tmp_path, healthy, "healthy").runs.iterrows():
        assert not _flags(run) & {"vanishing_activations", "exploding_activations", "symmetric_units"}, \
            run["init"]


def test_reports_build_for_every_outcome(tmp_path):
    """Every job overflowed at step 0 (one-point curves); a mix of that and healthy jobs; one job."""
    everything = OVERFLOW.replace('init = ["scaled_normal"]', 'init = ["scaled_normal"]\nseed = [0, 1]\n'
                                  'activation = ["linear", "relu"]').replace('activation = "linear"', "")
    runs = _sweep(tmp_path, everything, "all_step0").runs
    assert (runs["diverged_at"] == 0).all()
    mixed = everything.replace('init = ["scaled_normal"]', 'init = ["scaled_normal", "kaiming_normal"]')
    r = _sweep(tmp_path, mixed, "mixed")
    kaiming = r.runs[r.runs["init"] == "kaiming_normal"]
    assert len(kaiming) == 4 and not (kaiming["diverged_at"] == 0).any()  # these start healthy
    summary = bench.summarize(r)
    assert len(summary) == 4 and set(summary.columns) >= {"init", "activation", "n"}


# --- 2. one name per axis ------------------------------------------------------------------------
AXES = """
name = "every_axis"
[grid]
init = ["kaiming_normal", "xavier_uniform"]
"init_params.kaiming_normal.mode" = ["fan_in", "fan_out"]
"init_params.xavier_uniform.gain" = [1.0, 1.5]
depth = [2, 3]
lr = [0.05]
"task.noise" = [0.0, 0.1]
seed = {seeds}
[model]
width = 8
[task]
name = "teacher"
n_train = 64
n_val = 32
[train]
steps = 20
batch_size = 16
log_every = 10
"""


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_every_axis_kind_round_trips(tmp_path, capsys, seeds):
    r = _sweep(tmp_path, AXES.format(seeds=seeds), "axes")
    assert r.axes == ["init", "init.mode", "init.gain", "depth", "lr", "task.noise", "seed"]
    assert all(a in r.runs.columns for a in r.axes)
    assert axis_column("init_params.kaiming_normal.mode") == "init.mode" and axis_column("depth") == "depth"
    # 2 modes for kaiming + 2 gains for xavier, x 2 depths x 2 noises: 16 cells, whatever the seeds.
    summary = bench.summarize(r)
    assert len(summary) == 16 and (summary["n"] == len(seeds)).all()
    assert set(summary["init.mode"].dropna()) == {"fan_in", "fan_out"}
    with pytest.raises(KeyError, match="init_params"):
        bench.summarize(r, by=["init_params.kaiming_normal.mode"])
    # The report's summary and scheme labels, the closing table, a regression check: the same names.
    out = tmp_path / "axes"
    written = pd.read_csv(out / "summary.csv")
    assert {"init.mode", "init.gain", "depth", "task.noise"} <= set(written.columns)
    assert "(mode=fan_out)" in (out / "report.html").read_text()
    table = runner.best_schemes(r.runs, r.axes)
    assert "best init per depth, lr, task.noise" in table.splitlines()[0] and "init.mode" in table
    assert regress.main(["save", str(out), "--to", str(tmp_path / "base.json")]) == 0
    capsys.readouterr()
    assert regress.main(["check", str(out), "--against", str(tmp_path / "base.json")]) == 0
    doc = json.loads((out / "regression.json").read_text())
    assert "init.mode=fan_out" in json.dumps(doc)


# --- 3. symmetric units, and a stall that the output bias hides -----------------------------------
@pytest.fixture(scope="module")
def zero_init(tmp_path_factory) -> Results:
    return _sweep(tmp_path_factory.mktemp("zero"), ZERO_INIT, "zero_init")


def test_zero_init_units_stay_copies_and_the_run_is_stalled(zero_init):
    runs = zero_init.runs.set_index(zero_init.runs["init_bias"].astype(str))
    for bias in ("auto", "0.1"):
        run = runs.loc[bias]
        assert {"symmetric_units", "stalled"} <= _flags(run), bias
        # One distinct unit of 32 in each hidden layer, at the start and at the end.
        assert run["symmetric_frac_init"] == pytest.approx(31 / 32)
        assert run["symmetric_frac_final"] == pytest.approx(31 / 32)
        # Learning the output bias takes the loss from E[y^2] to about Var(y): no progress.
        assert run["null_loss"] == pytest.approx(run["best_loss"], rel=0.1)
        assert run["best_loss"] <= 0.9 * run["initial_loss"]  # what the old rule called progress
    layers = zero_init.layers
    hidden = layers[(layers["param"] == "weight") & (layers["index"] < 4)]
    assert set(hidden["distinct_frac"].dropna().round(5)) == {round(1 / 32, 5)}


def test_zero_init_matches_plain_pytorch_rank_one():
    job = [j for j in spec.parse(ZERO_INIT).jobs() if j.init_bias == 0.1][0]
    out = engine.train([job], keep_params=True)
    for w in out.final_params[0][0:4:2]:  # the two hidden weight matrices, (out, in)
        assert torch.linalg.matrix_rank(w.double()).item() <= 1
        assert torch.allclose(w, w[:1].expand_as(w), rtol=1e-5, atol=1e-7)  # identical rows


def test_distinct_frac_on_known_layers():
    g = torch.Generator().manual_seed(0)
    k, fan_in, n = 5, 7, 8
    w = torch.randn(k, fan_in, n, generator=g)
    b = torch.randn(k, n, generator=g)
    w[1] = w[1, :, :1]  # every unit the same incoming weights ...
    b[1] = b[1, 0]  # ... and bias: one distinct unit
    w[2, :, 4:] = w[2, :, :4]  # units 4..7 copy 0..3
    b[2, 4:] = b[2, :4]
    w[3] = w[3, :, :1]  # same weights, different biases: distinct units
    w[4], b[4] = 0, 0  # all-zero: one distinct unit
    w[2, 0, 7] += 1e-7  # a float-rounding difference is still a copy
    got = probes.distinct_frac(w, b)
    np.testing.assert_allclose(got.numpy(), [1.0, 1 / n, 0.5, 1.0, 1 / n])


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_symmetric_units_siblings_on_classification(tmp_path, activation):
    """Constant-bias zero init on a classification task, other activations: same diagnosis."""
    text = (ZERO_INIT.replace('init_bias = ["auto", 0.1]', "init_bias = [0.1]")
            .replace('activation = "relu"', f'activation = "{activation}"')
            .replace('name = "teacher"\nn_train = 512', 'name = "spirals"')
            .replace("steps = 300", "steps = 100"))
    run = _sweep(tmp_path, text).runs.iloc[0]
    assert "symmetric_units" in _flags(run) and run["symmetric_frac_final"] > 0.9
    assert run["null_loss"] == pytest.approx(math.log(2), rel=1e-3)  # two balanced spirals
    healthy = text.replace('init = ["zeros"]', 'init = ["xavier_normal"]')
    run = _sweep(tmp_path, healthy, "healthy").runs.iloc[0]
    assert "symmetric_units" not in _flags(run) and run["symmetric_frac_final"] == 0


def test_null_loss_of_known_targets():
    x = torch.zeros(4, 1)
    reg = tasks.TaskData(x, torch.tensor([[1.0], [3.0], [1.0], [3.0]]), x, x, None)
    assert reg.null_loss == pytest.approx(1.0)  # variance of {1, 3}
    cls = tasks.TaskData(x, torch.tensor([0, 0, 0, 1]), x, x, 2)
    assert cls.null_loss == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_stalled_is_judged_against_the_null_model():
    cfg = MetricsConfig()
    stats = np.full((3, 3, 4, 8), 1.0)

    def flags(loss, null):
        params, rows = as_rows(stats)
        m = metrics.job_metrics(np.array([0, 10, 20]), np.array(loss), np.array(loss), np.full(3, np.nan),
                                params, rows, -1, 20, cfg, null_loss=null)
        return metrics.pathologies(m, cfg)

    assert "stalled" in flags([1.39, 1.05, 1.0], null=1.0)  # only the bias was learned
    assert "stalled" not in flags([1.39, 0.8, 0.6], null=1.0)  # 40 % below the null model
    assert "stalled" in flags([0.5, 0.48, 0.47], null=1.0)  # started below the null model, no progress
    assert "stalled" not in flags([1.39, 1.05, 1.0], null=float("nan"))  # unknown: the old rule


# --- 4. the documented GELU gain ----------------------------------------------------------------
def test_gelu_gain_fixes_q_at_one_only_and_that_point_is_unstable(tmp_path):
    g2 = theory.activation_gain("gelu") ** 2
    assert theory.activation_gain("gelu") == pytest.approx(1.534, abs=1e-3)
    # q = 1 maps to itself (the README's claim) ...
    np.testing.assert_allclose(theory.variance_map("gelu", g2, 0.0, 1 / g2, 5), 1.0, rtol=1e-9)
    # ... but the map's slope there is above 1: away from q = 1 the signal drifts geometrically.
    eps = 1e-5
    slope = (theory.variance_map("gelu", g2, 0.0, (1 + eps) / g2, 2)[1] - 1) / eps
    assert slope == pytest.approx(1.14, abs=0.01)
    up = theory.variance_map("gelu", g2, 0.0, 1.0, 30)  # a unit-variance input: q_1 = g^2 = 2.35
    assert up[0] == pytest.approx(2.35, abs=0.01) and up[-1] > 100
    down = theory.variance_map("gelu", g2, 0.0, 0.9 / g2, 30)
    assert down[-1] < 0.01
    # Measured on the README's case (30 layers, width 256, kaiming_normal): it grows as theory says.
    text = (OVERFLOW.replace('init = ["scaled_normal"]', 'init = ["kaiming_normal"]')
            .replace("depth = 20", "depth = 30").replace('activation = "linear"', 'activation = "gelu"')
            .replace("steps = 10", "steps = 2").replace("log_every = 5", "log_every = 1"))
    r = _sweep(tmp_path, text)
    pre = r.layers[(r.layers["step"] == 0) & (r.layers["param"] == "preact")].sort_values("index")
    assert pre["q"].iloc[-1] / pre["q"].iloc[0] > 20
    ratio = (pre["q"] / pre["q_pred"]).to_numpy()
    assert np.all((ratio > 0.5) & (ratio < 2)), ratio
