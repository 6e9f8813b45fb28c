"""Faults of real machines: dead workers, out-of-memory, Ctrl-C, bad stores, hostile user code."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench
from bench import planner, spec, sweep
from bench.errors import UserError
from tests.conftest import QUIET_ENV, ROOT, run_cli, wait_rows

# Among the longest files: run first (see tests/conftest.py).
pytestmark = pytest.mark.slow

FACTORIES = '''
import os
import torch

def _data(seed, n_train):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train, 4, generator=g)
    return x, x.sum(1, keepdim=True), x[:16], x[:16].sum(1, keepdim=True)

def exits(seed, n_train=64):
    if seed == 3:
        os._exit(3)  # as a segfault or the OOM killer would: no exception, no cleanup
    return _data(seed, n_train)

def oom(seed, n_train=64):
    if seed == 2:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return _data(seed, n_train)

def wrong_shapes(seed, n_train=64):
    x, y, xv, yv = _data(seed, n_train)
    return x, y[:10], xv, yv

def nans(seed, n_train=64):
    x, y, xv, yv = _data(seed, n_train)
    x[0, 0] = float("nan")
    return x, y, xv, yv

def not_tensors(seed, n_train=64):
    return [[1, 2]], [3], [[1, 2]], [3]
'''


def user_spec(tmp_path: Path, factory: str, seeds: str = "[0, 1, 2, 3, 4, 5]", extra: str = "") -> Path:
    (tmp_path / "userdata.py").write_text(FACTORIES)
    path = tmp_path / f"{factory}.toml"
    path.write_text(f'name = "{factory}"\n[grid]\nseed = {seeds}\nwidth = [8, 16]\n{extra}'
                    '[model]\ndepth = 2\n'
                    f'[task]\nname = "userdata:{factory}"\n[train]\nsteps = 30\nbatch_size = 16\n')
    return path


def user_env(tmp_path: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{tmp_path}:{ROOT}"}


def test_a_dead_worker_fails_only_its_job_and_a_rerun_retries_only_that(tmp_path):
    path, out = user_spec(tmp_path, "exits"), tmp_path / "out"
    proc = run_cli("bench.sweep", str(path), "--out", str(out), "--no-report", "--jobs", "2",
                   env=user_env(tmp_path))
    assert proc.returncode == 1, proc.stderr
    runs = bench.load(out).runs
    assert len(runs) == 12 and runs["job_id"].is_unique
    failed = runs[runs["status"] == "failed"]
    assert sorted(failed["seed"]) == [3, 3]
    assert failed["error"].str.contains("worker exited with code 3").all()
    assert (runs[runs["seed"] != 3]["status"] == "ok").all()
    con = sqlite3.connect(out / "store.sqlite")
    finished_before = dict(con.execute("SELECT job_id, finished_at FROM runs").fetchall())
    con.close()
    again = run_cli("bench.sweep", str(path), "--out", str(out), "--no-report", "--quiet", "--jobs", "2",
                    env=user_env(tmp_path))
    assert again.returncode == 1
    con = sqlite3.connect(out / "store.sqlite")
    finished_after = dict(con.execute("SELECT job_id, finished_at FROM runs").fetchall())
    con.close()
    retried = {k for k in finished_after if finished_after[k] != finished_before[k]}
    assert retried == set(failed["job_id"])


def test_out_of_memory_halves_the_bundle_until_the_culprit_is_alone(tmp_path):
    path, out = user_spec(tmp_path, "oom", extra=""), tmp_path / "out"
    proc = run_cli("bench.sweep", str(path), "--out", str(out), "--no-report", "--quiet",
                   env=user_env(tmp_path))
    assert proc.returncode == 1
    runs = bench.load(out).runs
    failed = runs[runs["status"] == "failed"]
    assert sorted(failed["seed"]) == [2, 2]
    assert failed["error"].str.contains("out of memory on cpu even alone").all()
    assert (runs[runs["seed"] != 2]["status"] == "ok").all()


def test_bad_user_data_is_a_failed_job_with_a_clear_error(tmp_path):
    (tmp_path / "userdata.py").write_text(FACTORIES)
    path, out = tmp_path / "bad.toml", tmp_path / "out"
    path.write_text('name = "bad"\n[grid]\ntask = ["userdata:wrong_shapes", "userdata:nans", '
                    '"userdata:not_tensors", "userdata:exits"]\n[model]\ndepth = 2\nwidth = 8\n'
                    '[train]\nsteps = 30\nbatch_size = 16\n')
    proc = run_cli("bench.sweep", str(path), "--out", str(out), "--no-report", "--quiet",
                   env=user_env(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = bench.load(out).runs.set_index("task")["error"]
    assert "lengths differ" in errors["userdata:wrong_shapes"]
    assert "NaN or inf" in errors["userdata:nans"]
    assert "must return 4 tensors" in errors["userdata:not_tensors"]
    assert errors["userdata:exits"] == ""  # seed 0 is fine: one bad factory does not fail the others


# 16 bundles of one job, about 0.1 s each: Ctrl-C after 2 stored jobs lands with most of the sweep to go.
SLOW = """
name = "slow"
[grid]
width = [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
[model]
depth = 3
[task]
name = "teacher"
n_train = 256
[train]
steps = 150
batch_size = 64
"""


def test_ctrl_c_stops_promptly_keeps_finished_jobs_and_says_how_to_resume(tmp_path):
    path, out = tmp_path / "slow.toml", tmp_path / "out"
    path.write_text(SLOW)
    proc = subprocess.Popen([sys.executable, "-m", "bench.sweep", str(path), "--out", str(out), "--no-report",
                             "--quiet", "--jobs", "2"], cwd=ROOT, env=QUIET_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_rows(out, 2, proc)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert time.time() - sent < 20, "Ctrl-C must stop dispatch promptly"
    assert proc.returncode == 130
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    kept = len(bench.load(out).runs)
    assert kept >= 2
    # The resume, in this process: what the interrupted process left is what is under test.
    assert sweep.main([str(path), "--out", str(out), "--no-report", "--quiet"]) == 0
    assert len(bench.load(out).runs) == 16


def test_an_unwritable_output_directory_is_a_clear_error(tiny_spec, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli("bench.sweep", str(tiny_spec), "--out", str(blocker / "sub"), "--no-report")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot create or write" in proc.stderr


@pytest.mark.parametrize("content", [b"garbage, not sqlite" * 100, "foreign"])
def test_a_corrupt_or_foreign_store_is_refused_not_overwritten(tiny_spec, tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    store = out / "store.sqlite"
    if content == "foreign":
        con = sqlite3.connect(store)
        con.execute("CREATE TABLE customers (name TEXT)")
        con.commit()
        con.close()
    else:
        store.write_bytes(content)
    before = store.read_bytes()
    proc = run_cli("bench.sweep", str(tiny_spec), "--out", str(out), "--no-report")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "store" in proc.stderr
    assert store.read_bytes() == before


def test_device_lists_are_parsed_against_the_visible_devices():
    assert planner.parse_devices("auto", cuda_count=0) == ["cpu"]
    assert planner.parse_devices("auto", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert planner.parse_devices("cuda", cuda_count=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert planner.parse_devices("cuda:1, cuda:0", cuda_count=2) == ["cuda:1", "cuda:0"]
    assert planner.parse_devices("cpu", cuda_count=4) == ["cpu"]
    for bad, count in (("cuda", 0), ("cuda:2", 2), ("tpu", 1), ("cuda:x", 1)):
        with pytest.raises(UserError):
            planner.parse_devices(bad, cuda_count=count)


def test_bundles_are_balanced_across_devices_by_estimated_cost():
    jobs = spec.parse('[grid]\ndepth = [2, 4, 8, 16]\nseed = [0, 1, 2, 3]\nwidth = [32, 64]\n'
                      '[train]\nsteps = 10\n').jobs()
    devices = ["cuda:0", "cuda:1", "cuda:2"]
    bundles = planner.plan(jobs, devices, max_bundle=4)
    assert sorted(j.job_id for b in bundles for j in b.jobs) == sorted(j.job_id for j in jobs)
    load = {d: sum(b.cost for b in bundles if b.device == d) for d in devices}
    biggest = max(b.cost for b in bundles)
    # Greedy LPT: no device exceeds another by more than the largest bundle.
    assert max(load.values()) - min(load.values()) <= biggest
    assert all(len({j.shape_key() for j in b.jobs}) == 1 for b in bundles)
    assert planner.choose_workers(bundles, devices) == 3
