"""The sweep end to end, as a user runs it: CLI subprocess, store, resume, kill, failures.

The command runs as a process of its own where that is the point (its output and exit code, a
kill, a reader beside a writer, user code in workers); otherwise ``bench.sweep.main`` runs in this
process, and tests that only read a finished tiny sweep share one.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bench
from bench import spec as spec_mod
from bench import sweep
from tests.conftest import QUIET_ENV, ROOT, TINY_SPEC, run_cli, wait_rows

# Among the longest files: run first (see tests/conftest.py).
pytestmark = pytest.mark.slow

RUN_COLUMNS = ["init", "depth", "width", "activation", "lr", "seed", "task", "optimizer", "job_id", "status",
               "error", "steps_to_target", "final_loss", "best_loss", "loss_auc", "final_val_loss",
               "final_val_acc", "diverged_at", "grad_ratio_init", "act_ratio_init", "dead_frac_init",
               "dead_frac_final", "weight_growth", "n_spikes", "pathologies", "wall_s", "device",
               "torch_version"]


def stored_rows(out: Path) -> dict[str, tuple]:
    con = sqlite3.connect(out / "store.sqlite")
    try:
        return {r[0]: r[1:] for r in con.execute("SELECT job_id, status, metrics, finished_at FROM runs")}
    finally:
        con.close()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """TINY_SPEC swept once through the CLI: (spec, output directory, the process). Copy before writing."""
    base = tmp_path_factory.mktemp("tiny")
    spec_path, out = base / "tiny.toml", base / "out"
    spec_path.write_text(TINY_SPEC)
    proc = run_cli("bench.sweep", str(spec_path), "--out", str(out), "--no-report")
    assert proc.returncode == 0, proc.stderr
    return spec_path, out, proc


def copy_of(tiny_run, tmp_path: Path) -> tuple[Path, Path]:
    spec_path, out, _ = tiny_run
    shutil.copy(spec_path, tmp_path / "tiny.toml")
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "tiny.toml", tmp_path / "out"


def test_sweep_stores_one_row_per_job_with_every_column(tiny_run):
    tiny_spec, out, proc = tiny_run
    results = bench.load(out)
    jobs = spec_mod.load(tiny_spec).jobs()
    assert len(results.runs) == len(jobs) == 12
    assert set(results.runs["job_id"]) == {j.job_id for j in jobs}
    missing = [c for c in RUN_COLUMNS if c not in results.runs.columns]
    assert not missing
    assert set(results.curves.columns) >= {"job_id", "step", "train_loss", "val_loss", "val_acc", "grad_norm"}
    assert set(results.layers["param"]) == {"weight", "bias", "act", "preact"}
    zeros = results.runs[results.runs["init"] == "zeros"]
    assert zeros["pathologies"].str.contains("dead_units").all()
    assert "best init per depth" in proc.stdout
    summary = bench.summarize(results, by=["init", "depth"])
    assert len(summary) == 6 and summary["n"].eq(2).all()


def test_rerun_resumes_and_fresh_starts_over(tiny_run, tmp_path, capsys):
    tiny_spec, out = copy_of(tiny_run, tmp_path)
    before = stored_rows(out)
    capsys.readouterr()
    assert sweep.main([str(tiny_spec), "--out", str(out), "--no-report"]) == 0
    assert "12 from an earlier run" in capsys.readouterr().out
    assert stored_rows(out) == before  # nothing retrained, nothing rewritten
    assert sweep.main([str(tiny_spec), "--out", str(out), "--no-report", "--quiet", "--fresh"]) == 0
    after = stored_rows(out)
    assert after.keys() == before.keys()
    assert all(after[k][2] > before[k][2] for k in after)
    # Same seeds, same numbers.
    assert all(json.loads(after[k][1]) == json.loads(before[k][1]) for k in after)


def test_a_different_spec_into_the_same_directory_is_refused(tiny_run, tmp_path):
    _, out = copy_of(tiny_run, tmp_path)
    before = stored_rows(out)
    other = tmp_path / "other.toml"
    other.write_text(TINY_SPEC.replace("lr = [0.05]", "lr = [0.02]"))
    proc = run_cli("bench.sweep", str(other), "--out", str(out), "--no-report")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--fresh" in proc.stderr
    assert stored_rows(out) == before


FACTORY = '''
import torch

def load(seed, n_train=64):
    if seed == 1:
        raise RuntimeError("planted failure for seed 1")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train, 4, generator=g)
    return x, x.sum(1, keepdim=True), x[:16], x[:16].sum(1, keepdim=True)
'''


def test_a_job_that_raises_is_a_failed_row_and_is_retried(tmp_path):
    (tmp_path / "userdata.py").write_text(FACTORY)
    spec_path = tmp_path / "fail.toml"
    spec_path.write_text('name = "fail"\n[grid]\nseed = [0, 1, 2]\n[model]\nwidth = 8\ndepth = 2\n'
                         '[task]\nname = "userdata:load"\nn_train = 64\n'
                         '[train]\nsteps = 20\nbatch_size = 16\n')
    out = tmp_path / "out"
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    proc = run_cli("bench.sweep", str(spec_path), "--out", str(out), "--no-report", env=env)
    assert proc.returncode == 1
    runs = bench.load(out).runs.set_index("seed")
    assert list(runs.sort_index()["status"]) == ["ok", "failed", "ok"]
    assert "planted failure for seed 1" in runs.loc[1, "error"]
    # The failing job's bundle-mate was retried alone because its bundle raised: its note says so.
    assert runs.loc[[0, 2], "engine_note"].str.startswith("retried alone: its bundle raised").any(), \
        runs["engine_note"].tolist()
    before = stored_rows(out)
    again = run_cli("bench.sweep", str(spec_path), "--out", str(out), "--no-report", env=env)
    assert again.returncode == 1  # retried, failed again
    after = stored_rows(out)
    failed_id = runs.loc[1, "job_id"]
    assert after[failed_id][2] > before[failed_id][2]
    assert all(after[k] == before[k] for k in before if k != failed_id)


# 24 jobs in 12 bundles, about 0.08 s each: a kill after 1 or 8 stored jobs still lands with a second
# or more of the sweep to go (asserted below), and the reference takes under 2 s.
SLOW_SPEC = """
name = "slow"
[grid]
width = [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
seed = [0, 1]
[model]
depth = 3
[task]
name = "teacher"
n_train = 256
[train]
steps = 100
batch_size = 64
"""


def test_sigkill_then_rerun_gives_every_job_once_and_the_same_results(tmp_path):
    spec_path = tmp_path / "slow.toml"
    spec_path.write_text(SLOW_SPEC)
    reference = tmp_path / "reference"
    assert sweep.main([str(spec_path), "--out", str(reference), "--no-report", "--quiet"]) == 0
    expected = bench.load(reference).runs.set_index("job_id")
    for kill_after in (1, 8):
        out = tmp_path / f"killed{kill_after}"
        proc = subprocess.Popen([sys.executable, "-m", "bench.sweep", str(spec_path), "--out", str(out),
                                 "--no-report", "--quiet", "--jobs", "1"], cwd=ROOT, env=QUIET_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_rows(out, kill_after, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = stored_rows(out)
        assert 0 < len(before) < 24, "the kill should land mid-sweep"
        # The resume, in this process: the store the killed process left is what is under test.
        assert sweep.main([str(spec_path), "--out", str(out), "--no-report", "--quiet"]) == 0
        after = stored_rows(out)
        assert len(after) == 24
        assert all(after[k] == before[k] for k in before)  # rows stored before the kill unchanged
        con = sqlite3.connect(out / "store.sqlite")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
        got = bench.load(out).runs.set_index("job_id").loc[expected.index]
        for col in ("final_loss", "steps_to_target", "grad_ratio_init", "act_ratio_init"):
            np.testing.assert_allclose(got[col].astype(float), expected[col].astype(float), rtol=1e-5)


def test_load_while_a_sweep_is_writing(tmp_path):
    spec_path = tmp_path / "slow.toml"
    spec_path.write_text(SLOW_SPEC)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bench.sweep", str(spec_path), "--out", str(out),
                             "--no-report", "--quiet", "--jobs", "1"], cwd=ROOT, env=QUIET_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_rows(out, 2, proc)
        partial = bench.load(out)
        assert 2 <= len(partial.runs) <= 24
        assert set(partial.curves["job_id"]) <= set(partial.runs["job_id"])
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == 0
    assert len(bench.load(out).runs) == 24


def test_dry_run_counts_jobs_and_bundles(tiny_spec):
    proc = run_cli("bench.sweep", str(tiny_spec), "--dry-run")
    assert proc.returncode == 0
    assert "12 jobs in 2 bundles" in proc.stdout


def test_summarize_default_groups_by_the_grid_axes(tiny_run):
    _, out, _ = tiny_run
    summary = bench.summarize(bench.load(out))
    assert list(summary.columns[:3]) == ["init", "depth", "lr"]
    assert isinstance(summary, pd.DataFrame) and len(summary) == 6
