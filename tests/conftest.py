"""Shared test fixtures: tiny seeded specs, the repo root, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
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
