"""How sweeps are split and run: worker counts, and bundles trained concurrently by threads."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from bench import dispatch, planner, spec
from tests.conftest import QUIET_ENV, ROOT

MIXED = """
[grid]
init = ["default", "kaiming_normal", "orthogonal", "lsuv"]
seed = [0, 1, 2]
[model]
depth = 3
width = 8
[task]
name = "teacher"
n_train = 128
[train]
steps = 15
batch_size = 16
"""


@pytest.mark.parametrize("cores, spec_text, user_code, expected", [
    (2, "[grid]\nseed = [0, 1]\n[train]\nsteps = 10\n", False, 0),  # tiny: a pool costs more than it saves
    (2, "[grid]\nseed = [0, 1]\n[train]\nsteps = 100000\n", False, 0),  # big, one bundle: no parallelism
    (2, "[grid]\ndepth = [2, 4]\n[train]\nsteps = 100000\n", False, 0),  # two cores: threads do as well
    (4, "[grid]\ndepth = [2, 4]\n[train]\nsteps = 100000\n", False, 2),  # two big bundles, four cores
    (8, "[grid]\ndepth = [2, 4, 8]\n[train]\nsteps = 100000\n", False, 3),  # one worker per bundle
    (1, "[grid]\ndepth = [2, 4]\n[train]\nsteps = 100000\n", False, 0),  # one core
    (2, "[grid]\nseed = [0, 1]\n[train]\nsteps = 10\n", True, 2),  # user code is always isolated in workers
])
def test_worker_count_follows_cost_bundles_cores_and_user_code(monkeypatch, cores, spec_text, user_code,
                                                               expected):
    monkeypatch.setattr(planner.os, "cpu_count", lambda: cores)
    jobs = spec.parse(spec_text).jobs()
    if user_code:  # as a spec naming a factory "module:function" would give (not imported here)
        jobs = [dataclasses.replace(job, task="factories:exits") for job in jobs]
    bundles = planner.plan(jobs, ["cpu"])
    assert planner.choose_workers(bundles, ["cpu"]) == expected


def test_bundles_trained_by_concurrent_threads_match_bundles_trained_one_after_another():
    # Models are built from the process's global RNG (seeded per job): threads building at the
    # same time must not draw from each other's streams.
    parsed = spec.parse(MIXED)
    bundles = planner.plan(parsed.jobs(), ["cpu"], max_bundle=1)
    alone = {r.job_id: r for r in dispatch.execute(bundles, parsed.metrics, workers=0)}
    for _ in range(3):
        run = dispatch.execute(bundles, parsed.metrics, workers=4, backend="threading")
        threaded = {r.job_id: r for r in run}
        assert threaded.keys() == alone.keys() and len(alone) == 12
        for job_id, r in alone.items():
            assert threaded[job_id].status == r.status == "ok"
            assert threaded[job_id].curves["train_loss"].tolist() == r.curves["train_loss"].tolist(), job_id


KEEP_PROBE = """
import resource, sys, torch
from bench import dispatch
if sys.argv[1] == "keep":
    dispatch.keep_freed_memory()
def faults_per_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):  # allocate, use, free: 64 MB, above any size glibc serves from its heap by default
        torch.ones(2**24).add_(1)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
faults_per_step()
print(faults_per_step())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_a_training_process_reuses_freed_memory_instead_of_faulting_it_back_in():
    def faults(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", KEEP_PROBE, mode], cwd=ROOT, env=QUIET_ENV,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return float(done.stdout)

    # The engine's tensors are smaller (a few MB), and whether glibc returns them depends on the
    # heap's history; 64 MB is mapped afresh (16,384 pages) on every allocation, always.
    assert faults("default") > 10_000
    assert faults("keep") < 10


LATE_TASK = """
import torch


def load(seed):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(seed))
    return x, x.sum(1, keepdim=True), x[:16], x[:16].sum(1, keepdim=True)
"""
LATE_SPEC = ('[grid]\nseed = [0, 1]\n[model]\ndepth = 2\nwidth = 4\n[task]\nname = "{task}"\n'
             '[train]\nsteps = 2\nbatch_size = 16\n')


def test_a_reused_worker_imports_user_code_from_a_path_added_after_it_started(tmp_path, monkeypatch):
    """loky reuses its worker processes between sweeps of one Python process (a notebook), and a
    worker's sys.path is the parent's at its start: user code on a path added since must import."""
    def run(text: str) -> list:
        sweep = spec.parse(text)
        bundles = planner.plan(sweep.jobs(), ["cpu"], max_bundle=1, workers=2)
        return list(dispatch.execute(bundles, sweep.metrics, workers=2))

    assert [r.status for r in run(LATE_SPEC.format(task="teacher"))] == ["ok", "ok"]  # the pool starts
    (tmp_path / "latetask.py").write_text(LATE_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    results = run(LATE_SPEC.format(task="latetask:load"))
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
