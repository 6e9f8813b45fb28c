"""Tests for the regression gate: bench.regress (CLI), bench.verdict (statistics), bench.baseline (files).

End to end: a tiny sweep is saved as a baseline; an identical rerun and a rerun with other
seeds pass; PyTorch's default Linear init scaled by 0.1 in every process (a sitecustomize on
PYTHONPATH, so loky workers are patched too) is caught. The statistics are tested on synthetic
cells with known answers: planted shifts found, no shift not found at the stated rate, many
comparisons controlled.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from bench import regress, spec, sweep
from bench.baseline import cell_key, load_baseline, widen_seeds
from bench.errors import UserError
from bench.verdict import (
    Cell,
    Policy,
    bh,
    moderated_p,
    parse_table,
    parse_tolerance,
)
from tests.conftest import run_cli

# Among the longest files: run first (see tests/conftest.py).
pytestmark = pytest.mark.slow

# Depth 3-4 at width 16: deep enough that a 10x smaller default init stalls training and kills
# units, yet a sweep of 24 jobs takes seconds. Four seeds give the check room to spare.
SPEC = """
name = "gate"
[grid]
init = ["default", "kaiming_normal", "xavier_uniform"]
depth = [3, 4]
seed = [0, 1, 2, 3]
[model]
width = 16
[task]
name = "teacher"
n_train = 128
n_val = 64
[train]
lr = 0.2
steps = 80
batch_size = 32
log_every = 10
[regression]
tolerance = {steps_to_target = "20%"}
"""
# Imported by every Python process that has its folder on PYTHONPATH: the parent and each loky worker.
SITECUSTOMIZE = """
import torch
from torch import nn

_reset = nn.Linear.reset_parameters


def _scaled(self):
    _reset(self)
    with torch.no_grad():
        self.weight.mul_(0.1)


nn.Linear.reset_parameters = _scaled
"""


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> Path:
    """A swept and saved baseline of SPEC: ``base/`` and ``base.json``."""
    root = tmp_path_factory.mktemp("gate")
    (root / "gate.toml").write_text(SPEC)
    (root / "reseeded.toml").write_text(SPEC.replace("seed = [0, 1, 2, 3]", "seed = [4, 5, 6, 7]"))
    assert sweep.main([str(root / "gate.toml"), "--out", str(root / "base"), "--no-report", "--quiet"]) == 0
    assert regress.main(["save", str(root / "base"), "--to", str(root / "base.json")]) == 0
    return root


def _run(gate: Path, spec_name: str, out: str, *extra: str) -> int:
    return regress.main(["run", str(gate / spec_name), "--against", str(gate / "base.json"),
                         "--out", str(gate / out), "--no-report", "--quiet", *extra])


def _report(directory: Path) -> dict:
    return json.loads((directory / "regression.json").read_text())


# --- end to end ---------------------------------------------------------------------------------
def test_baseline_file_is_compact_versioned_and_keyed_without_seeds(gate):
    doc = json.loads((gate / "base.json").read_text())
    assert doc["format"] == "initbench-baseline" and doc["version"] == 1
    assert doc["environment"]["torch_version"] and "[regression]" in doc["spec"]["text"]
    assert len(doc["cells"]) == 6 and all(c["seeds"] == [0, 1, 2, 3] for c in doc["cells"])
    labels = sorted(c["label"] for c in doc["cells"])
    assert labels[0] == "init=default depth=3"
    assert "seed" not in json.dumps([c["settings"] for c in doc["cells"]])
    baseline = load_baseline(gate / "base.json")
    assert all(cell_key(c.settings) == k for k, c in baseline.cells.items())


def test_identical_rerun_passes(gate, capsys):
    assert _run(gate, "gate.toml", "same") == 0
    doc = _report(gate / "same")
    assert doc["passed"] and doc["summary"]["regressions"] == 0 and doc["summary"]["improvements"] == 0
    # the spec's [regression] table reached the policy; the defaults fill in the rest
    assert doc["policy"]["tolerances"]["steps_to_target"] == "20%"
    assert doc["policy"]["tolerances"]["final_loss"] == "10%" and doc["policy"]["alpha"] == 0.01
    assert (gate / "same" / "regression.md").read_text().startswith("# Regression check")
    assert "-> pass" in capsys.readouterr().out


def test_rerun_with_other_seeds_passes(gate):
    assert _run(gate, "reseeded.toml", "reseeded") == 0
    doc = _report(gate / "reseeded")
    assert doc["passed"] and not doc["missing"] and not doc["new"]
    tested = [r for r in doc["rows"] if r["verdict"] != "untested"]
    assert len(tested) >= 25 and all(r["n_current"] <= 4 for r in tested)


def test_planted_default_init_regression_is_caught_in_every_worker(gate, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    out = gate / "planted"
    proc = run_cli("bench.regress", "run", str(gate / "gate.toml"), "--against", str(gate / "base.json"),
                   "--out", str(out), "--jobs", "2", "--no-report", "--quiet", env={"PYTHONPATH": path})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSION" in proc.stdout and "-> FAIL" in proc.stdout
    doc = _report(out)
    found = {(r["cell"], r["metric"]) for r in doc["rows"] if r["verdict"] == "regression"}
    assert len(found) >= 3
    assert all(cell.startswith("init=default") for cell, _ in found)  # named schemes overwrite the draw
    assert {m for _, m in found} & {"final_loss", "dead_frac_init", "act_ratio_init"}
    why = (out / "regression.md").read_text()
    assert "exceeds tolerance" in why and "q = " in why


def test_cells_on_one_side_only_fail_unless_allowed(gate, tmp_path, capsys):
    doc = json.loads((gate / "base.json").read_text())
    dropped = doc["cells"].pop(0)
    extra = json.loads(json.dumps(doc["cells"][0]))
    extra["settings"]["depth"] = 9
    extra["key"] = cell_key({**doc["settings"], **extra["settings"]})
    doc["cells"].append(extra)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    args = ["check", str(gate / "base"), "--against", str(edited)]
    assert regress.main(args) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and "NEW" in out and dropped["label"] in out and "depth=9" in out
    report = _report(gate / "base")
    assert [m["cell"] for m in report["new"]] == [dropped["label"]] and len(report["missing"]) == 1
    assert regress.main([*args, "--allow-missing"]) == 0


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ('{"format": "initbench-audit", "version": 1}', "not an initbench baseline"),
    ('{"format": "initbench-baseline", "version": 99}', "format version 99"),
    ('{"format": "initbench-baseline", "version": 1, "metrics": [], "cells": [{"key": "x"}]}', "cell #0"),
])
def test_bad_baselines_are_one_line_errors(gate, tmp_path, capsys, content, message):
    path = tmp_path / "base.json"
    if content is not None:
        path.write_text(content)
    assert regress.main(["check", str(gate / "base"), "--against", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_baseline_of_another_spec_is_bad_input(gate, tmp_path, capsys):
    doc = json.loads((gate / "base.json").read_text())
    doc["settings"]["width"] = 99
    for cell in doc["cells"]:
        cell["key"] = cell_key({**doc["settings"], **cell["settings"]})
    (tmp_path / "b.json").write_text(json.dumps(doc))
    assert regress.main(["check", str(gate / "base"), "--against", str(tmp_path / "b.json"),
                         "--allow-missing"]) == 2
    assert "no grid cell in common" in capsys.readouterr().err


def test_a_hand_edited_cell_is_refused(gate, tmp_path, capsys):
    doc = json.loads((gate / "base.json").read_text())
    doc["cells"][0]["settings"]["depth"] = 5
    (tmp_path / "b.json").write_text(json.dumps(doc))
    assert regress.main(["check", str(gate / "base"), "--against", str(tmp_path / "b.json")]) == 2
    assert "does not match its settings" in capsys.readouterr().err


@pytest.mark.parametrize("flag, message", [
    ("final_loss", "expected METRIC:TOL"),
    ("final_los:5%", "unknown metric 'final_los'"),
    ("final_loss:abc", "expected a tolerance"),
    ("final_loss:-1", "expected a tolerance"),
])
def test_bad_fail_flags_exit_2_with_one_line(gate, capsys, flag, message):
    with pytest.raises(SystemExit) as exit_:
        regress.main(["check", str(gate / "base"), "--against", str(gate / "base.json"), "--fail", flag])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_fail_flags_set_tolerances_and_watch_metrics(gate):
    args = ["check", str(gate / "base"), "--against", str(gate / "base.json")]
    assert regress.main([*args, "--fail", "steps_to_target:5%", "--fail", "best_loss:0.01"]) == 0
    policy = _report(gate / "base")["policy"]
    assert policy["tolerances"]["steps_to_target"] == "5%" and policy["tolerances"]["best_loss"] == "0.01"
    assert policy["metrics"][-1] == "best_loss"


@pytest.mark.parametrize("table, message", [
    ("metrics = ['final_los']", "unknown metric 'final_los'"),
    ("metric = ['final_loss']", "unknown key 'metric'"),
    ("alpha = 1.5", "alpha = 1.5"),
    ("tolerance = {final_loss = '5'}", ""),
    ("tolerance = {final_loss = 'ten%'}", "tolerance.final_loss"),
    ("tolerance = 0.1", "expected a table"),
])
def test_spec_regression_table_is_validated(table, message):
    text = f'name = "x"\n[regression]\n{table}\n'
    if not message:
        assert spec.parse(text, "x.toml").regression
        return
    with pytest.raises(UserError, match="x.toml") as err:
        spec.parse(text, "x.toml")
    assert message in str(err.value)


def test_parse_table_builds_the_policy():
    policy = parse_table({"metrics": ["final_loss", "act_ratio_init"], "alpha": 0.05,
                          "tolerance": {"final_loss": "5%", "steps_to_target": 10}}, "[regression]")
    assert policy.metrics == ("final_loss", "act_ratio_init", "steps_to_target") and policy.alpha == 0.05
    assert str(policy.tolerance("final_loss")) == "5%" and str(policy.tolerance("steps_to_target")) == "10"
    assert parse_tolerance("0.01", "x").relative is False and parse_tolerance("2.5%", "x").value == 0.025


def test_run_passes_a_bad_spec_through_as_2(gate, capsys):
    assert _run(gate, "missing.toml", "nowhere") == 2
    assert "spec file not found" in capsys.readouterr().err


CRASHING_TASK = """
import torch


def load(seed):
    if seed == 1:
        raise RuntimeError("planted crash")
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    return x, x.sum(1, keepdim=True), x[:16], x[:16].sum(1, keepdim=True)
"""


def test_crashed_jobs_are_still_checked_and_fail(tmp_path, monkeypatch, capsys):
    (tmp_path / "crashtask.py").write_text(CRASHING_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = ('name = "crash"\n[grid]\nseed = [0, 2]\n[model]\ndepth = 2\nwidth = 8\n'
            '[task]\nname = "crashtask:load"\n[train]\nsteps = 10\nbatch_size = 16\n')
    (tmp_path / "ok.toml").write_text(text)
    (tmp_path / "crash.toml").write_text(text.replace("[0, 2]", "[0, 1, 2]"))
    assert sweep.main([str(tmp_path / "ok.toml"), "--out", str(tmp_path / "a"), "--no-report"]) == 0
    assert regress.main(["save", str(tmp_path / "a"), "--to", str(tmp_path / "b.json")]) == 0
    code = regress.main(["run", str(tmp_path / "crash.toml"), "--against", str(tmp_path / "b.json"),
                         "--out", str(tmp_path / "c"), "--no-report", "--quiet"])
    assert code == 1
    doc = _report(tmp_path / "c")
    assert not doc["passed"] and "planted crash" in doc["crashed"][0]["errors"][0]
    assert doc["summary"]["regressions"] == 0  # the two seeds that ran are unchanged
    assert "CRASHED" in capsys.readouterr().out


def test_baseline_command_sweeps_more_seeds_and_calibrate_measures_them(tmp_path, capsys):
    text = ('name = "wide"\n[grid]\ninit = ["default", "zeros"]\nseed = [0, 1]\n[model]\ndepth = 2\n'
            'width = 8\n[task]\nname = "teacher"\nn_train = 64\nn_val = 32\n[train]\nsteps = 20\n'
            'batch_size = 16\n')
    (tmp_path / "wide.toml").write_text(text)
    out, base = str(tmp_path / "d"), str(tmp_path / "b.json")
    assert regress.main(["baseline", str(tmp_path / "wide.toml"), "--seeds", "6", "--to", base, "--out", out,
                         "--no-report", "--quiet"]) == 0
    assert [c.seeds for c in load_baseline(tmp_path / "b.json").cells.values()] == [[0, 1, 2, 3, 4, 5]] * 2
    assert regress.main(["calibrate", str(tmp_path / "d"), "--seeds", "2", "--baseline-seeds", "3",
                         "--trials", "20"]) == 0
    assert "20 comparisons of 3 vs 2 disjoint seeds in 2 cells" in capsys.readouterr().out
    assert regress.main(["calibrate", str(tmp_path / "d"), "--seeds", "4"]) == 2
    assert "needs 4 + 4 seeds" in capsys.readouterr().err


@pytest.mark.parametrize("before, after, seeds", [
    ("[grid]\nseed = [0, 1]\n", "seed = [0, 1, 2, 3]", [0, 1, 2, 3]),
    ("[grid]\nseed = [\n  3,\n  5,\n]\n", "seed = [3, 5, 0, 1]", [3, 5, 0, 1]),
    ("[grid]\ndepth = [2]\n[train]\nseed = 7\n", "seed = [7, 0, 1, 2]", [7, 0, 1, 2]),
    ("[train]\nseed = 7\n", "seed = [7, 0, 1, 2]", [7, 0, 1, 2]),
])
def test_widen_seeds_rewrites_only_the_seed_axis(before, after, seeds):
    text, got = widen_seeds(f'name = "w"\n{before}', "w.toml", 4)
    assert got == seeds and after in text
    assert dict(spec.parse(text, "w.toml").grid)["seed"] == tuple(seeds)


# --- the statistics, on synthetic cells with known answers -------------------------------------
def _cell(values: dict[str, list[float]], seeds: list[int] | None = None, key: str = "c",
          status: list[str] | None = None) -> Cell:
    n = len(next(iter(values.values())))
    seeds = seeds if seeds is not None else list(range(n))
    values = {m: list(map(float, v)) for m, v in values.items()}
    return Cell(key, {"log_every": 10}, seeds, status or ["ok"] * n, values)


def _sweep(rng, n_cells: int, n_seeds: int, cv: float | np.ndarray, factor: np.ndarray | float = 1.0,
           metric: str = "final_loss", offset: int = 0) -> dict[str, Cell]:
    cvs = np.broadcast_to(cv, (n_cells,))
    factors = np.broadcast_to(factor, (n_cells,))
    return {f"c{i}": _cell({metric: np.exp(rng.normal(0, cvs[i], n_seeds)) * factors[i]},
                           list(range(offset, offset + n_seeds)), f"c{i}") for i in range(n_cells)}


def _flagged(current, baseline, policy) -> list[str]:
    return [c.key for c in regress.check(current, baseline, policy).comparisons if c.verdict == "regression"]


LOSS_ONLY = Policy(metrics=("final_loss",))


def test_a_twofold_shift_with_three_seeds_is_found():
    # One cell of ten doubles its loss; seed noise 5% (docs/ci.md: 88% found at 10%, 27% at 20%).
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(50):
        base = _sweep(rng, 10, 3, 0.05)
        cur = _sweep(rng, 10, 3, 0.05, factor=np.r_[2.0, np.ones(9)], offset=3)
        found = _flagged(cur, base, LOSS_ONLY)
        assert set(found) <= {"c0"}
        hits += found == ["c0"]
    assert hits >= 48


def test_no_shift_is_a_false_alarm_in_at_most_two_percent_of_sweeps():
    # 1000 reseeded sweeps of 10 cells whose noise differs tenfold between cells (as deep,
    # high-learning-rate cells are noisier): the stated whole-sweep rate is about 1%.
    rng = np.random.default_rng(1)
    cv = np.geomspace(0.05, 0.5, 10)
    policy = Policy(metrics=("final_loss", "act_ratio_init"))
    alarms = 0
    for _ in range(1000):
        base, cur = _sweep(rng, 10, 3, cv), _sweep(rng, 10, 3, cv, offset=3)
        for k in base:  # a second, "changed"-direction metric drawn the same way
            base[k].values["act_ratio_init"] = list(np.exp(rng.normal(0, cv[int(k[1:])], 3)))
            cur[k].values["act_ratio_init"] = list(np.exp(rng.normal(0, cv[int(k[1:])], 3)))
        alarms += bool(_flagged(cur, base, policy))
    assert alarms <= 20


def test_many_comparisons_are_corrected():
    # 100 null cells: uncorrected, p < alpha would fire in most sweeps; Benjamini-Hochberg keeps
    # the share of sweeps with any false alarm near alpha.
    rng = np.random.default_rng(2)
    raw, alarms = 0, 0
    for _ in range(100):
        base, cur = _sweep(rng, 100, 3, 0.1), _sweep(rng, 100, 3, 0.1, offset=3)
        report = regress.check(cur, base, Policy(metrics=("final_loss",), alpha=0.05))
        raw += any(c.p < 0.05 for c in report.comparisons)
        alarms += any(c.verdict == "regression" for c in report.comparisons)
    assert raw >= 90 and alarms <= 10


def test_the_tolerance_gates_changes_that_are_real_but_small():
    base = {"c": _cell({"final_loss": [1.0, 1.001, 0.999]})}
    cur = {"c": _cell({"final_loss": [1.05, 1.051, 1.049]}, seeds=[3, 4, 5])}
    assert _flagged(cur, base, LOSS_ONLY) == []
    assert regress.check(cur, base, LOSS_ONLY).comparisons[0].q < 1e-3  # real, just under 10%
    for tol, found in (("1%", ["c"]), (0.1, []), (0.01, ["c"])):
        policy = LOSS_ONLY.with_tolerances([("final_loss", parse_tolerance(tol, "x"))])
        assert _flagged(cur, base, policy) == found, tol


def test_directions_better_worse_and_changed_on_a_log_scale():
    policy = Policy(metrics=("final_loss", "final_val_acc", "act_ratio_init", "dead_frac_init"))
    base = {"c": _cell({"final_loss": [1.0, 1.1, 0.9], "final_val_acc": [0.9, 0.91, 0.89],
                        "act_ratio_init": [1.0, 1.1, 0.9], "dead_frac_init": [0.2, 0.22, 0.18]})}
    for factor, verdicts in [(0.5, {"final_loss": "improvement", "final_val_acc": "regression",
                                    "act_ratio_init": "regression", "dead_frac_init": "regression"}),
                             (2.0, {"final_loss": "regression", "final_val_acc": "improvement",
                                    "act_ratio_init": "regression", "dead_frac_init": "regression"})]:
        cur = {"c": _cell({m: [v * factor for v in vs] for m, vs in base["c"].values.items()})}
        got = {c.metric: c.verdict for c in regress.check(cur, base, policy).comparisons
               if c.verdict != "unchanged"}
        assert got == verdicts, factor


def test_converged_to_failed_in_most_shared_seeds_is_always_a_regression():
    base = {"c": _cell({"steps_to_target": [20, 30, 20]})}
    flipped = {"c": _cell({"steps_to_target": [math.nan, 20, 20]}, status=["diverged", "ok", "ok"])}
    assert _flagged(flipped, base, Policy()) == []  # one of three: statistics decide, and cannot
    flipped = {"c": _cell({"steps_to_target": [math.nan, math.nan, 20]}, status=["diverged", "ok", "ok"])}
    report = regress.check(flipped, base, Policy())
    rate = next(c for c in report.comparisons if c.metric == "success_rate")
    assert rate.verdict == "regression" and "2 of 3" in rate.message and "seed 0: diverged" in rate.message
    other_seeds = {"c": _cell({"steps_to_target": [math.nan, math.nan, 20]}, seeds=[3, 4, 5])}
    assert _flagged(other_seeds, base, Policy()) == []  # no shared seeds: Fisher on 3 vs 1 of 3 is no proof


def test_many_seeds_make_a_lost_success_rate_significant():
    base = {"c": _cell({"steps_to_target": [20.0] * 10})}
    cur = {"c": _cell({"steps_to_target": [20.0] * 2 + [math.nan] * 8}, seeds=list(range(10, 20)))}
    rate = regress.check(cur, base, Policy(metrics=("success_rate",))).comparisons[0]
    assert rate.verdict == "regression" and rate.change == pytest.approx(-0.8)


def test_steps_rounded_to_log_every_are_not_treated_as_exact():
    policy = Policy(metrics=("steps_to_target",))
    one_step = _flagged({"c": _cell({"steps_to_target": [40, 40, 40]})},
                        {"c": _cell({"steps_to_target": [30, 30, 30]})}, policy)
    three_fold = _flagged({"c": _cell({"steps_to_target": [60, 60, 60]})},
                          {"c": _cell({"steps_to_target": [20, 20, 20]})}, policy)
    assert one_step == [] and three_fold == ["c"]


def test_bh_and_the_t_test_match_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan, 0.001])
    q = bh(p)
    assert np.isnan(q[4])
    np.testing.assert_allclose(q[~np.isnan(p)], stats.false_discovery_control(p[~np.isnan(p)]))
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 3), rng.normal(1, 1, 4)
    assert moderated_p(a, b, 0.0, 0.0) == pytest.approx(stats.ttest_ind(a, b).pvalue)
    assert moderated_p(a, a + 0.0, 0.0, 0.0) == 1.0
