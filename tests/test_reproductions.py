"""The paper reproductions, at small scale: each shipped sweep, shrunk, still shows its paper's effect.

Each scaled-down spec is the shipped ``sweeps/<name>.toml`` with a few settings overridden (fewer
depths, seeds and steps, a narrower width), so the test follows the shipped sweep's settings. The
sweeps run in this process (``bench.sweep.main``, ``--jobs 1``) once per module; the checks read
them through the same functions that make docs/reproductions.md (``bench.reproductions``).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bench
from bench import reproductions, spec, sweep, theory, tutorial
from bench.train import bundle, tasks
from tests.conftest import ROOT, run_cli

torch.set_num_threads(1)

SWEEPS = ROOT / "sweeps"


def _toml_value(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _dump(doc: dict) -> str:
    """TOML text for a spec dict: top-level scalars, then one table per dict (nested as a.b)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]

    def table(prefix: str, body: dict) -> None:
        lines.append(f"[{prefix}]")
        lines.extend(f'"{k}" = {_toml_value(v)}' for k, v in body.items() if not isinstance(v, dict))
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    for k, v in doc.items():
        if isinstance(v, dict):
            table(k, v)
    return "\n".join(lines) + "\n"


def scaled(name: str, tmp: Path, **overrides: dict) -> Path:
    """sweeps/<name>.toml with each table's keys in ``overrides`` replaced, written under ``tmp``."""
    doc = tomllib.loads((SWEEPS / f"{name}.toml").read_text())
    for table, values in overrides.items():
        doc.setdefault(table, {}).update(values)
    path = tmp / f"{name}.toml"
    path.write_text(_dump(doc))
    return path


def run_sweep(path: Path, out: Path):
    code = sweep.main([str(path), "--out", str(out), "--no-report", "--quiet", "--jobs", "1"])
    assert code == 0
    return bench.load(out)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("repro")


# --- He et al. 2015 ------------------------------------------------------------------
@pytest.fixture(scope="module")
def he_run(work):
    path = scaled("he2015", work, grid={"depth": [20], "seed": [0, 1]}, model={"width": 32},
                  train={"steps": 100, "lr": 0.005, "log_every": 25})
    return work / "he2015", run_sweep(path, work / "he2015")


def test_he2015_kaiming_learns_where_xavier_stalls_at_depth_20(he_run):
    _, results = he_run
    table = reproductions.he_table(results).set_index("init")
    kaiming, xavier = table.loc["kaiming_normal"], table.loc["xavier_normal"]
    # Xavier: the 20-layer net's output carries no signal, so its loss never leaves ln(10).
    assert xavier["stalled"] == xavier["seeds"] == 2
    assert xavier["loss_ratio_mean"] > 0.95
    assert xavier["val_acc_max"] < 0.25  # chance is 0.1
    assert kaiming["stalled"] == 0
    assert kaiming["loss_ratio_mean"] < 0.8
    assert kaiming["val_acc_min"] > xavier["val_acc_max"] + 0.15
    # The cause, measured at step 0: Xavier halves the activation variance at every ReLU layer.
    runs = results.runs.set_index("init")
    assert (runs.loc["xavier_normal", "act_ratio_init"] < 1e-5).all()
    assert (runs.loc["kaiming_normal", "act_ratio_init"] > 1e-2).all()


# --- Glorot & Bengio 2010 --------------------------------------------------------------
@pytest.fixture(scope="module")
def glorot_run(work):
    path = scaled("glorot2010", work, grid={"seed": [0, 1]}, model={"width": 128},
                  train={"steps": 1, "log_every": 1})
    return work / "glorot2010", run_sweep(path, work / "glorot2010")


def test_glorot2010_standard_init_shrinks_activations_and_backprop_gradients(glorot_run):
    _, results = glorot_run
    table = reproductions.glorot_table(results).set_index("init")
    standard, xavier = table.loc["default"], table.loc["xavier_uniform"]
    # Activations: U(+-1/sqrt(n)) has n Var(w) = 1/3, so the std shrinks ~sqrt(3)-fold per layer.
    assert standard["act_last/first"] < 0.2
    assert xavier["act_last/first"] > 0.4
    assert standard["act_last/first"] < 0.5 * xavier["act_last/first"]
    # Back-propagated gradients shrink toward the input under the standard init, not under Xavier.
    assert standard["backprop_grad_max/min"] > 5
    assert xavier["backprop_grad_max/min"] < 2.5
    # Weight gradients: Xavier's stay within a factor 2 across layers (the paper's Fig. 8).
    assert xavier["weight_grad_max/min"] < 2
    profile = reproductions.glorot_profile(results)
    assert sorted(profile["layer"].unique()) == [1, 2, 3, 4, 5]  # hidden layers only


# --- Schoenholz et al. 2017 --------------------------------------------------------------
@pytest.fixture(scope="module")
def eoc_run(work):
    path = scaled("edge_of_chaos", work,
                  grid={"depth": [20], "init_params.mean_field.sigma_w2": [0.5, 1.76]},
                  model={"width": 32}, train={"steps": 150, "log_every": 25})
    return work / "edge_of_chaos", run_sweep(path, work / "edge_of_chaos")


def test_edge_of_chaos_near_critical_trains_where_ordered_does_not(eoc_run):
    _, results = eoc_run
    acc = reproductions.eoc_grid(results).loc[20]
    loss = reproductions.eoc_grid(results, "final_loss").loc[20]
    initial = reproductions.eoc_grid(results, "initial_loss").loc[20]
    # sigma_w2 = 0.5 is deep in the ordered phase: 6 xi_c ~ 7 layers, far below 20.
    assert acc[0.5] < 0.2 and loss[0.5] / initial[0.5] > 0.9
    assert acc[1.76] > 0.4 and loss[1.76] / initial[1.76] < 0.6
    agreement = reproductions.eoc_agreement(results)
    assert agreement["agree"] == 1.0


def test_edge_of_chaos_theory_depth_scale_diverges_at_the_critical_point():
    sigma_b2 = 0.05
    crit = theory.critical_sigma_w2("tanh", sigma_b2)
    assert 1.7 < crit < 1.8
    below = [theory.depth_scales("tanh", s, sigma_b2)[1] for s in (0.5, 1.0, 1.5, 0.99 * crit)]
    above = [theory.depth_scales("tanh", s, sigma_b2)[1] for s in (1.01 * crit, 2.5, 8.0)]
    assert below == sorted(below) and above == sorted(above, reverse=True)  # grows toward crit
    assert below[0] < 2 and below[-1] > 50 and above[0] > 50
    assert math.isinf(theory.depth_scales("tanh", crit, sigma_b2)[1]) or \
        theory.depth_scales("tanh", crit, sigma_b2)[1] > 1e3


# --- Saxe et al. 2013 ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def saxe_run(work):
    # Width 16 makes depth 16 as hard for the Gaussian product as depth 64 is at width 64.
    path = scaled("saxe2013", work, grid={"depth": [2, 16], "lr": [0.03], "seed": [0]},
                  model={"width": 16}, train={"steps": 150, "log_every": 10})
    return work / "saxe2013", run_sweep(path, work / "saxe2013")


def test_saxe2013_orthogonal_learning_time_grows_less_with_depth(saxe_run):
    _, results = saxe_run
    times = reproductions.saxe_times(results).groupby(["init", "depth"])["steps"].median()
    orth, gauss = times["orthogonal"], times["mean_field"].fillna(math.inf)  # never = slower than any
    assert np.isfinite(orth).all()
    assert orth[16] <= orth[2]  # depth-independent (here: even faster at depth 16)
    assert gauss[16] / gauss[2] > 2 * orth[16] / orth[2]
    assert gauss[16] > 2 * orth[16]


# --- the tutorial ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blog_run(work):
    return work / "blog", run_sweep(SWEEPS / "blog.toml", work / "blog")


def plain_tutorial(job: spec.Job) -> list[tuple[str, float] | str]:
    """The tutorial's loop, verbatim in spirit: nn.Sequential, MSELoss, optim.SGD, full batch."""
    data = tasks.load("blog", job.task_params, job.seed)
    model = bundle.build_model(job, data)
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    printed: list[tuple[str, float] | str] = []
    for epoch in range(job.steps):
        optimizer.zero_grad()
        loss = criterion(model(data.x_train), data.y_train)
        loss.backward()
        optimizer.step()
        printed.append(f"Epoch {epoch}")
        printed.extend((name, param.data.mean().item()) for name, param in model.named_parameters())
    return printed


def test_tutorial_prints_what_a_plain_pytorch_rerun_prints(blog_run, capsys):
    out, _ = blog_run
    job = spec.load(SWEEPS / "blog.toml").jobs()[0]
    assert (job.depth, job.width, job.lr, job.batch_size, job.log_every) == (2, 4, 0.01, 10, 1)
    assert tutorial.main([str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = plain_tutorial(job)
    assert len(lines) == len(expected) == 5 * job.steps
    for line, want in zip(lines, expected):
        if isinstance(want, str):
            assert line == want
        else:
            name, value = line.split(" ")
            assert name == want[0]
            assert float(value) == pytest.approx(want[1], abs=1e-5)
    assert [line.split(" ")[0] for line in lines[1:5]] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_tutorial_job_selection_and_errors(blog_run, glorot_run, capsys):
    blog_dir, blog = blog_run
    job_id = blog.runs["job_id"].iloc[0]
    assert tutorial.main([str(blog_dir), "--job", job_id[:6]]) == 0
    assert capsys.readouterr().out.startswith("Epoch 0\n0.weight ")
    several, _ = glorot_run
    assert tutorial.main([str(several)]) == 2  # several jobs and no --job
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose one with --job" in err
    assert tutorial.main([str(blog_dir), "--job", "zzz"]) == 2
    assert "matches no job" in capsys.readouterr().err


def test_tutorial_cli_missing_dir_is_one_line_exit_2(tmp_path):
    proc = run_cli("bench.tutorial", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no results store" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the figures and tables of the doc ------------------------------------------------------
def test_reproductions_render_every_figure(he_run, glorot_run, eoc_run, saxe_run, blog_run, tmp_path, capsys):
    dirs = [str(d) for d, _ in (he_run, glorot_run, eoc_run, saxe_run, blog_run)]
    assert reproductions.main([*dirs, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for name in ("he2015", "glorot2010", "edge_of_chaos", "saxe2013", "blog"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 300_000
        assert f"## {name}" in text
    assert reproductions.main([str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2


def test_shipped_reproduction_sweeps_are_valid_and_small():
    expected = {"he2015": 12, "glorot2010": 6, "edge_of_chaos": 66, "saxe2013": 72, "blog": 1}
    for name, n_jobs in expected.items():
        s = spec.load(SWEEPS / f"{name}.toml")
        assert s.name == name and name in reproductions.REPRODUCTIONS
        assert len(s.jobs()) == n_jobs
    blog = spec.load(SWEEPS / "blog.toml").jobs()[0]
    assert blog.task == "blog" and blog.init == "default" and blog.activation == "relu"
    eoc = spec.load(SWEEPS / "edge_of_chaos.toml").jobs()
    sigmas = sorted({dict(j.init_params)["sigma_w2"] for j in eoc})
    crit = theory.critical_sigma_w2("tanh", dict(eoc[0].init_params)["sigma_b2"])
    assert min(sigmas) < crit < max(sigmas)
    assert np.isclose(min(sigmas, key=lambda s: abs(s - crit)), crit, atol=0.01)
