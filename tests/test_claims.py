"""Claims about residual and convolutional inits (issue 14): each shipped sweep, shrunk, still shows them.

sweeps/fixup.toml, resnet_bn.toml, gpt2.toml and cnn.toml, each with a few settings overridden
(fewer seeds, lrs and steps), run in this process once per module (``bench.sweep.main``,
``--jobs 1``); the checks read them through the functions that make docs/reproductions.md
(``bench.reproductions``). Bounds are the numbers measured on the shipped sweeps (see the doc),
with room for the smaller runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench import reproductions, spec
from tests.test_reproductions import SWEEPS, run_sweep, scaled

# Among the longest files: run first (see tests/conftest.py).
pytestmark = pytest.mark.slow

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("claims")


# --- Fixup / SkipInit / zero-init residual, 64 blocks without norm --------------------
@pytest.fixture(scope="module")
def fixup_run(work):
    path = scaled("fixup", work, grid={"lr": [0.02]}, train={"steps": 30, "log_every": 10})
    return run_sweep(path, work / "fixup")


def test_fixup_step0_stream_variance(fixup_run):
    table = reproductions.fixup_step0(fixup_run).set_index(["task", "init"])
    assert sorted(table.index.get_level_values("task").unique()) == ["digits", "teacher"]
    for task in ("digits", "teacher"):
        he, default = table.loc[(task, "kaiming_normal")], table.loc[(task, "default")]
        # He on both layers of a no-norm ReLU branch: each block adds 2 Var(x), x3 per block.
        assert 2.5 < he["l=1"] < 3.5
        assert 2.5 < he["per_block"] < 3.5
        assert he["l=64"] > 1e25
        # PyTorch's default (Var(w) = 1/(3 fan_in)) grows too, moderately: ~1.06 per block, ~50x.
        assert 1.02 < default["per_block"] < 1.12
        assert 10 < default["l=64"] < 300
        # Fixup, SkipInit and zero_residual start every block as the identity: exactly 1.
        for init in ("fixup", "skipinit", "zero_residual"):
            row = table.loc[(task, init)]
            for col in ("l=1", "l=8", "l=32", "l=64"):
                assert row[col] == pytest.approx(1.0, rel=1e-5), (task, init, col)


def test_fixup_which_schemes_train_at_lr_002(fixup_run):
    runs = fixup_run.runs.set_index(["task", "init"])
    # digits: Fixup and SkipInit train; He explodes at step 1, default and zero_residual diverge within
    # a few steps (measured: steps 6 and 10).
    for init in ("fixup", "skipinit"):
        row = runs.loc[("digits", init)]
        assert row["status"] == "ok"
        assert row["final_loss"] < 0.5 * row["initial_loss"]
    assert runs.loc[("digits", "kaiming_normal"), "diverged_at"] == 1
    for init in ("default", "zero_residual"):
        assert runs.loc[("digits", init), "status"] == "diverged"
        assert runs.loc[("digits", init), "diverged_at"] <= 20
    # teacher regression: at lr 0.02 every scheme diverges (Fixup last, measured at step 14).
    teacher = runs.loc["teacher"]
    assert (teacher["status"] == "diverged").all()
    assert teacher.loc["fixup", "diverged_at"] >= teacher["diverged_at"].drop("fixup").max()


# --- BatchNorm in the branch ---------------------------------------------------------
@pytest.fixture(scope="module")
def bn_run(work):
    path = scaled("resnet_bn", work, grid={"seed": [0]}, train={"steps": 20, "log_every": 10})
    return run_sweep(path, work / "resnet_bn")


def test_resnet_bn_stream_grows_like_l_plus_1_under_he(bn_run):
    table = reproductions.bn_table(bn_run).set_index("init")
    he = table.loc["kaiming_normal"]
    var_in = he["var_in"]
    assert 1.3 < var_in < 3.5  # the He stem on standardized digits: 2 E[x^2] (seeds 0-2: 2.65, 2.06 mean)
    for n in (4, 16, 64):
        predicted = 1 + 2 * n / var_in
        assert he[f"l={n}"] == pytest.approx(predicted, rel=0.3), n
    assert 40 < he["l=64"] < 90  # measured 61.2 (3 seeds), l + 1 = 65
    for init in ("skipinit", "zero_residual"):
        for n in (1, 8, 64):
            assert table.loc[init, f"l={n}"] == pytest.approx(1.0, rel=1e-5), (init, n)
    # All three train (a BN net at lr 0.02): the loss falls within 20 steps.
    runs = bn_run.runs
    assert (runs["status"] == "ok").all()
    assert (runs["final_loss"] < 0.7 * runs["initial_loss"]).all()


# --- GPT-2's scaled residual init --------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_run(work):
    path = scaled("gpt2", work, grid={"depth": [2, 8], "seed": [0]}, train={"steps": 10, "log_every": 5})
    return run_sweep(path, work / "gpt2")


def test_gpt2_scaled_residual_keeps_the_stream_flat_in_depth(gpt2_run):
    table = reproductions.gpt2_table(gpt2_run).set_index(["init", "depth"])
    plain = table.loc["scaled_normal", "var_ratio_last"]
    gpt2 = table.loc["gpt2", "var_ratio_last"]
    # Unscaled N(0, 0.02^2): each of the 2 L branches adds about as much; measured 1.9 (L=2), 5.0 (L=8).
    assert 1.5 < plain[2] < 2.5
    assert 3.5 < plain[8] < 7
    # Scaled by 1/sqrt(2 L): the total added does not depend on depth (measured 1.21, 1.23).
    assert 1.05 < gpt2[2] < 1.45
    assert 1.05 < gpt2[8] < 1.45
    assert abs(np.log(gpt2[8] / gpt2[2])) < 0.2
    # Both train: the loss falls below ln(16) = 2.77 within 10 Adam steps, no divergence.
    runs = gpt2_run.runs
    assert (runs["status"] == "ok").all()
    assert (runs["final_loss"] < runs["initial_loss"] - 0.05).all()


# --- init schemes on a plain CNN ---------------------------------------------------
@pytest.fixture(scope="module")
def cnn_run(work):
    path = scaled("cnn", work, grid={"seed": [0, 1]}, train={"steps": 1, "log_every": 1})
    return run_sweep(path, work / "cnn")


def test_cnn_step0_signal_per_scheme(cnn_run):
    table = reproductions.cnn_table(cnn_run).set_index("scheme")
    assert sorted(table.index) == ["default", "kaiming_normal(fan_in)", "kaiming_normal(fan_out)",
                                   "orthogonal", "xavier_normal"]
    fan_in, fan_out = table.loc["kaiming_normal(fan_in)"], table.loc["kaiming_normal(fan_out)"]
    # Kaiming keeps the signal (per layer ~0.9: zero padding on 8x8 images costs ~16 %).
    assert fan_in["per_layer"] > 0.75
    # fan_out differs only in the first conv (1 -> 16 channels: fan_out = 16 fan_in): q / 16.
    assert fan_out["q_first"] == pytest.approx(fan_in["q_first"] / 16, rel=1e-3)
    assert fan_out["last/first"] == pytest.approx(fan_in["last/first"], rel=1e-3)
    # Xavier and orthogonal (gain 1) halve the signal per ReLU layer; default falls, then its biases hold it.
    for scheme in ("xavier_normal", "orthogonal"):
        assert 0.3 < table.loc[scheme, "per_layer"] < 0.6, scheme
        assert table.loc[scheme, "last/first"] < 0.01, scheme
    assert table.loc["default", "last/first"] < 0.03
    assert table.loc["default", "q_last"] < 0.01 * fan_in["q_last"]


# --- the figures, tables and shipped specs ---------------------------------------------
def test_claims_render_every_figure(fixup_run, bn_run, gpt2_run, cnn_run, work, tmp_path, capsys):
    names = ("fixup", "resnet_bn", "gpt2", "cnn")
    assert reproductions.main([*(str(work / n) for n in names), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for name in names:
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 300_000
        assert f"## {name}" in text


def test_shipped_claim_sweeps_are_valid_and_small():
    expected = {"fixup": 40, "resnet_bn": 9, "gpt2": 18, "cnn": 15}
    for name, n_jobs in expected.items():
        s = spec.load(SWEEPS / f"{name}.toml")
        assert s.name == name and name in reproductions.REPRODUCTIONS
        assert len(s.jobs()) == n_jobs, name
    fixup = spec.load(SWEEPS / "fixup.toml").jobs()
    assert {j.task for j in fixup} == {"digits", "teacher"} and {j.depth for j in fixup} == {64}
    assert 0.02 in {j.lr for j in fixup}


# --- muP's coordinate check --------------------------------------------------------------------
MUP = """
name = "mup_coord"
[grid]
init = ["kaiming_normal", "mup"]
width = [32, 64, 128]
seed = [0]
[model]
arch = "resmlp"
depth = 2
[init_params.mup]
base_width = 32
[task]
name = "teacher"
n_train = 256
[train]
optimizer = "adam"
lr = 0.01
steps = 1
batch_size = 64
log_every = 1
"""


def test_mup_keeps_coordinates_flat_in_width_where_standard_parametrization_grows(tmp_path):
    """The mup package's coordinate check through the engine: after one Adam update the standard
    parametrization's output grows about as width^2 (measured +2.0 at widths 64-512), muP's stays flat."""
    from bench import reproductions, sweep
    from bench.store import load

    spec = tmp_path / "mup.toml"
    spec.write_text(MUP)
    out = tmp_path / "out"
    assert sweep.main([str(spec), "--out", str(out), "--quiet", "--no-report", "--jobs", "1"]) == 0
    table = reproductions.coord_table(load(out))
    mup, sp = table[table["init"] == "mup"], table[table["init"] == "kaiming_normal"]
    assert (mup["slope"].abs() < 0.15).all(), mup
    head = sp[(sp["module"] == "head") & (sp["step"] == 1)]["slope"].item()
    assert head > 0.5 and sp[sp["step"] == 1]["grows"].any()  # measured +0.73 here (widths 32-128)
    assert not mup["grows"].any()


def test_mup_learning_rates_are_per_parameter():
    import textwrap

    from bench import spec
    from bench.train import functional, tasks
    from bench.train.bundle import build_model

    jobs = [j for j in spec.parse(textwrap.dedent(MUP)).jobs() if j.init == "mup" and j.width == 128]
    data = [tasks.load(j.task, j.task_params, j.seed) for j in jobs]
    built = [build_model(j, d) for j, d in zip(jobs, data)]
    scale = functional._lr_scale(jobs, built, functional._Bundle(built, torch.device("cpu")))
    assert scale is not None and set(scale.unique().tolist()) == {1.0, 32 / 128}  # Adam: hidden / width_mult
