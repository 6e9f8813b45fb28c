"""The dask backend on a real cluster: a `dask scheduler` and two `dask worker` processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench
from tests.conftest import ROOT, run_cli, wait_rows

# Among the longest files: run first (see tests/conftest.py).
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """A scheduler and two nanny-less workers (a killed worker stays dead)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = open(tmp_path / "cluster.log", "w")
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], stdout=logs, stderr=logs, env=env, cwd=tmp_path)]
    time.sleep(1.0)
    for name in ("w1", "w2"):
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                                       "--name", name, "--dashboard-address", ":0"],
                                      stdout=logs, stderr=logs, env=env, cwd=tmp_path))
    from distributed import Client

    client = Client(address, timeout=30)
    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)  # worker address -> pid
    client.close()
    yield address, list(pids.values())
    for p in procs:
        p.kill()
        p.wait()
    logs.close()


SPEC = """
name = "dask"
[grid]
init = ["default", "kaiming_normal"]
width = [8, 12, 16]
seed = [0, 1]
[model]
depth = 3
[task]
name = "teacher"
n_train = 256
[train]
steps = %d
batch_size = 32
"""


def metrics_of(out: Path) -> dict[str, dict]:
    con = sqlite3.connect(out / "store.sqlite")
    rows = {k: json.loads(m) for k, m in con.execute("SELECT job_id, metrics FROM runs")}
    con.close()
    return rows


def test_a_dask_cluster_gives_the_same_results_as_loky(cluster, tmp_path):
    address, _ = cluster
    spec = tmp_path / "dask.toml"
    spec.write_text(SPEC % 40)
    on_dask = run_cli("bench.sweep", str(spec), "--out", str(tmp_path / "dask"), "--scheduler", address,
                      "--no-report", "--quiet")
    assert on_dask.returncode == 0, on_dask.stderr
    # A process of its own: loky workers started from this one would be reused by later in-process
    # sweeps in this test worker, blind to the sys.path entries their user code is added on (loky does
    # not pass a grown sys.path to a running worker; tests/test_regress.py's crash test needs it).
    local = run_cli("bench.sweep", str(spec), "--out", str(tmp_path / "loky"), "--jobs", "2", "--no-report",
                    "--quiet")
    assert local.returncode == 0, local.stderr
    a, b = metrics_of(tmp_path / "dask"), metrics_of(tmp_path / "loky")
    assert a.keys() == b.keys() and len(a) == 12
    for job_id in a:
        for name, value in a[job_id].items():
            assert value == pytest.approx(b[job_id][name], rel=1e-5, nan_ok=True), (job_id, name)
    assert set(bench.load(tmp_path / "dask").runs["status"]) == {"ok"}


def test_a_killed_worker_is_survived_and_losing_every_worker_does_not_hang(cluster, tmp_path):
    address, pids = cluster
    spec = tmp_path / "dask.toml"
    spec.write_text(SPEC % 1500)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INITBENCH_DASK_GRACE_S": "5"}
    proc = subprocess.Popen([sys.executable, "-m", "bench.sweep", str(spec), "--out", str(out), "--scheduler",
                             address, "--no-report", "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_rows(out, 1, proc)
    os.kill(pids[0], signal.SIGKILL)  # mid-bundle: dask moves its task to the other worker
    wait_rows(out, 5, proc)
    os.kill(pids[1], signal.SIGKILL)  # now no worker is left: the sweep must end, not wait forever
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1, stderr
    runs = bench.load(out).runs
    assert len(runs) == 12 and runs["job_id"].is_unique
    failed = runs[runs["status"] == "failed"]
    assert len(failed) >= 1 and failed["error"].str.contains("no dask worker left").all()
    assert (runs["status"] == "ok").sum() >= 2
