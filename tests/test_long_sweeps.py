"""Faults of sweeps that run for days, injected for real: SIGTERM, a file-size limit, a second runner,
a killed runner's lock, a damaged store. After each, the same command resumes: every job once, the
rows stored before unchanged, results equal to an uninterrupted run, no process left behind.

The faulty runs are processes of their own (signals, rlimits and locks need one). What is not
itself under test runs in this process through ``bench.sweep.main``, the same code without the
second of starting Python and importing torch: the uninterrupted reference and the resumes (the
store and lock a dead process left behind are the same to a resume in any process)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench
from bench import store, sweep
from bench.errors import UserError
from bench.report import build
from tests.conftest import QUIET_ENV, ROOT, count_rows, run_cli, wait_rows

# Among the longest files: run first (see tests/conftest.py).
pytestmark = pytest.mark.slow

# Twelve bundles of one job each (every width is its own shape): about half a second each.
SPEC = """
name = "long"
[grid]
width = [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
[model]
depth = 3
[task]
name = "teacher"
n_train = 256
[train]
steps = 300
batch_size = 64
"""
N_JOBS = 12


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The output directory of one uninterrupted run of SPEC (read it, or copy it before writing)."""
    base = tmp_path_factory.mktemp("reference")
    (base / "long.toml").write_text(SPEC)
    assert sweep_here(base / "long.toml", base / "out") == 0
    return base / "out"


@pytest.fixture(scope="module")
def reference(finished) -> dict[str, dict]:
    """Every job's metrics from one uninterrupted run."""
    return {k: v["metrics"] for k, v in rows(finished).items()}


def sweep_here(spec: Path, out: Path, *flags: str) -> int:
    """The sweep command, run in this process (see the module docstring)."""
    return sweep.main([str(spec), "--out", str(out), "--no-report", "--quiet", *flags])


@pytest.fixture
def spec_path(tmp_path) -> Path:
    path = tmp_path / "long.toml"
    path.write_text(SPEC)
    return path


def rows(out: Path) -> dict[str, dict]:
    """job_id -> the stored row as it is on disk (finished_at tells a rewritten row)."""
    con = sqlite3.connect(f"file:{out / 'store.sqlite'}?mode=ro", uri=True)
    try:
        return {job_id: {"status": status, "finished_at": at, "metrics": json.loads(metrics)}
                for job_id, status, at, metrics in
                con.execute("SELECT job_id, status, finished_at, metrics FROM runs")}
    finally:
        con.close()


def start(spec: Path, out: Path, *flags: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """A sweep in its own session, so that every process it starts can be found afterwards."""
    return subprocess.Popen([sys.executable, "-m", "bench.sweep", str(spec), "--out", str(out), "--no-report",
                             "--quiet", *flags], cwd=ROOT, env={**QUIET_ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)


def alive_in_session(sid: int) -> list[str]:
    """Processes of session ``sid`` that are still running (zombies are dead, only not yet reaped)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
        except OSError:
            continue
        state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            found.append(f"{pid} {cmd}")
    return found


def assert_nothing_left(sid: int, within: float = 10.0) -> None:
    # loky's resource trackers exit when they see the sweep's end of their pipe close: allow them
    # a moment; workers must already be gone.
    deadline = time.time() + within
    while alive_in_session(sid) and time.time() < deadline:
        time.sleep(0.1)
    assert alive_in_session(sid) == []


def assert_resumes_to_the_uninterrupted_result(spec: Path, out: Path, before: dict, reference: dict,
                                               *flags: str) -> None:
    assert sweep_here(spec, out, *flags) == 0
    after = rows(out)
    assert set(after) == set(reference)  # every job exactly once (job_id is the primary key)
    for job_id, row in before.items():
        if row["status"] != "failed":
            assert after[job_id] == row, "a row stored before the fault was rewritten"
    for job_id, metrics in reference.items():
        assert after[job_id]["status"] == "ok"
        for name, value in metrics.items():
            got = after[job_id]["metrics"][name]
            assert got == pytest.approx(value, rel=1e-5, nan_ok=True), (job_id, name)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- SIGTERM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, after_rows", [((), 0), ((), 3), (("--jobs", "2"), 2)],
                         ids=["in-process-at-start", "in-process-mid-sweep", "loky-mid-sweep"])
def test_sigterm_finishes_the_jobs_in_flight_stores_them_and_exits_143(spec_path, tmp_path, reference, flags,
                                                                       after_rows):
    out = tmp_path / "out"
    proc = start(spec_path, out, *flags)
    if after_rows:
        wait_rows(out, after_rows, proc)
    else:
        time.sleep(1.0)  # importing torch: before any store or worker exists
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert time.time() - sent < 15
    line = one_line(stderr)
    assert line.startswith("terminated:") and "rerun the same command to resume" in line
    assert "finished within the grace period" in line
    assert_nothing_left(proc.pid)
    before = rows(out)
    assert after_rows <= len(before) < N_JOBS
    assert all(r["status"] == "ok" for r in before.values())
    assert_resumes_to_the_uninterrupted_result(spec_path, out, before, reference)


def test_after_the_grace_period_the_jobs_in_flight_are_abandoned_and_the_workers_killed(spec_path, tmp_path,
                                                                                         reference):
    out = tmp_path / "out"
    proc = start(spec_path, out, "--jobs", "2", env={"INITBENCH_TERM_GRACE_S": "0.05"})
    wait_rows(out, 2, proc)
    # The whole process group, as SLURM signals a job step: the workers leave it to the sweep.
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "abandoned" in one_line(stderr)
    assert_nothing_left(proc.pid)
    before = rows(out)
    assert all(r["status"] == "ok" for r in before.values()), "a worker stopped by the sweep is no failed job"
    assert_resumes_to_the_uninterrupted_result(spec_path, out, before, reference)


def test_sigterm_closes_a_local_dask_cluster(spec_path, tmp_path):
    out = tmp_path / "out"
    proc = start(spec_path, out, "--backend", "dask", "--jobs", "2")
    wait_rows(out, 1, proc, timeout=120)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 143, stderr
    assert "terminated:" in stderr and "Traceback" not in stderr
    assert_nothing_left(proc.pid, within=20)
    assert all(r["status"] == "ok" for r in rows(out).values())


# --- A full disk ---------------------------------------------------------------------------------------


def test_a_file_size_limit_stops_the_sweep_with_one_line_and_a_rerun_resumes(spec_path, tmp_path, reference):
    out = tmp_path / "out"

    def limited() -> None:  # in the sweep process only: RLIMIT_FSIZE, and EFBIG instead of SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, resource.RLIM_INFINITY))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = start(spec_path, out, "--jobs", "2", preexec_fn=limited)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    line = one_line(stderr)
    assert str(out / "store.sqlite") in line and "file-size limit" in line
    assert "rerun the same command to resume" in line
    assert_nothing_left(proc.pid)
    before = rows(out)
    assert 0 < len(before) < N_JOBS
    assert len(bench.load(out).runs) == len(before)  # intact and loadable
    assert_resumes_to_the_uninterrupted_result(spec_path, out, before, reference)


# --- A second runner, a killed runner's lock, readers while a sweep runs -------------------------------


def test_a_second_runner_is_refused_naming_the_first_and_readers_still_work(spec_path, tmp_path, reference):
    out = tmp_path / "out"
    procs = [start(spec_path, out), start(spec_path, out)]  # together: either may get the lock
    while all(p.poll() is None for p in procs):
        time.sleep(0.05)
    loser = next(p for p in procs if p.poll() is not None)  # refused at once; the sweep takes seconds
    winner = next(p for p in procs if p is not loser)
    _, err = loser.communicate()
    assert loser.returncode == 2, err
    line = one_line(err)
    assert "in use by another sweep" in line and f"(pid {winner.pid} on host " in line and "started" in line
    wait_rows(out, 2, winner)
    assert winner.poll() is None, "the readers below should run while the sweep writes"
    assert len(bench.load(out).runs) >= 2  # readers take no lock
    assert build(out).is_file()  # the report, in this process: another process than the writer
    _, err = winner.communicate(timeout=120)
    assert winner.returncode == 0, err
    assert set(rows(out)) == set(reference)


def test_a_killed_runner_never_blocks_the_resume(spec_path, tmp_path, reference):
    out = tmp_path / "out"
    proc = start(spec_path, out, "--jobs", "2")
    wait_rows(out, 2, proc)
    proc.kill()
    proc.wait()
    before = rows(out)
    assert (out / "sweep.lock").exists()  # the file stays; its flock died with the process
    assert_resumes_to_the_uninterrupted_result(spec_path, out, before, reference)


# --- A damaged store ---------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def scribble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle: middle + 3 * 4096] = os.urandom(3 * 4096)  # three pages, as a bad sector would
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, scribble])
def test_a_damaged_store_is_refused_untouched_and_recovered_on_request(spec_path, tmp_path, finished,
                                                                       reference, damage):
    out = tmp_path / "out"
    shutil.copytree(finished, out)  # a finished sweep of the same spec
    intact = rows(out)
    store = out / "store.sqlite"
    damage(store)
    damaged = store.read_bytes()

    with pytest.raises(UserError, match="damaged.*can be read back.*bench.store recover"):
        bench.load(out)
    proc = run_cli("bench.sweep", str(spec_path), "--out", str(out), "--no-report", "--quiet")
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "the store is damaged" in line and f"python -m bench.store recover {out}" in line
    assert store.read_bytes() == damaged, "a damaged store must never be written"

    fixed = run_cli("bench.store", "recover", str(out))
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.startswith("recovered ") and "kept as" in fixed.stdout
    kept = list(out.glob("store.damaged-*.sqlite"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged
    recovered = rows(out)
    assert set(recovered) < set(intact)
    assert all(recovered[k] == intact[k] for k in recovered), "a recovered row differs from the original"
    assert_resumes_to_the_uninterrupted_result(spec_path, out, recovered, reference)


def test_recovering_a_healthy_store_changes_nothing(tiny_spec, tmp_path, capsys):
    out = tmp_path / "out"
    assert sweep_here(tiny_spec, out) == 0
    before = (out / "store.sqlite").read_bytes()
    capsys.readouterr()
    assert store.main(["recover", str(out)]) == 0  # the command itself runs through a process above
    assert "not damaged" in capsys.readouterr().out
    assert (out / "store.sqlite").read_bytes() == before
    assert count_rows(out) == 12
