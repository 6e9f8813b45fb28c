"""Shared test fixtures: tiny seeded specs, the repo root, and a CLI runner."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tests run in parallel on a 2-core machine: one matmul thread each avoids oversubscription
# (spinning OpenMP threads competing for cores can slow a step down a hundredfold).
torch.set_num_threads(1)


# One thread per test process: the suite runs on every core at once (pytest-xdist).
QUIET_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(module: str, *args: str, env: dict | None = None, timeout: float = 300,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args...`` as a user would, capturing output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def count_rows(out: Path) -> int:
    """Jobs stored so far in a sweep directory, read as a concurrent reader (0 before the store exists)."""
    try:
        con = sqlite3.connect(f"file:{out / 'store.sqlite'}?mode=ro", uri=True)
        try:
            return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def wait_rows(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``n`` jobs are stored, the sweep process ends, or ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while count_rows(out) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)


TINY_SPEC = """
name = "tiny"
[grid]
init = ["default", "kaiming_normal", "zeros"]
depth = [2, 3]
lr = [0.05]
seed = [0, 1]
[model]
width = 8
[task]
name = "teacher"
n_train = 128
n_val = 64
[train]
steps = 30
batch_size = 32
log_every = 10
"""


@pytest.fixture
def tiny_spec(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SPEC)
    return path


# Scheduling. pytest-xdist hands out whole files (--dist loadfile) to two workers on two cores. By
# default it sorts the files by how many tests they hold, which puts the few-but-long end-to-end files
# (dask, sweep, faults) last, so that one worker ran alone for their last ~20 s. Instead: the files
# marked slow first, in file order, and the many quick files after them to even out the finish.
def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.8
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept
