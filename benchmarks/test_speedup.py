"""The stacked engine against the classic loop on the target workload, in one process.

The issue's 48 jobs (specs/target.toml: 4 inits x 4 learning rates x 3 seeds; depth 6,
width 64, batch 128, probes every 10 steps) trained as one bundle, and the same jobs
trained one at a time by ``bench.train.reference.train_plain(record=True)``, rounds interleaved
and at the same thread count. Both sides build the same models, so the ratio hardly
depends on the step count: 50 steps here, 300 with ``--bench-full``. Target: >= 8x.

The ceiling: the same run also times the bundle's matrix products alone (the forward,
backward and validation ``bmm`` calls of every step, shapes exactly the engine's, nothing
else). No implementation of this training with these products can beat the classic loop
by more than ``classic time / matmul time`` on this machine at this thread count.
"""

from __future__ import annotations

import torch

from bench.spec import Job
from bench.train import models, tasks
from bench.train import stacked as engine
from benchmarks import classic_loop
from benchmarks.conftest import (
    interleaved,
    median,
    paired_ratio,
    record,
    seconds,
    spec_jobs,
    warm_torch_optim,
)

SHORT_STEPS = 50
TARGET = 8.0
FLOOR_STEPS = 20  # the matmul floor is timed over this many steps, best of 3, then scaled


def matmul_floor(jobs: list[Job], device: str) -> float:
    """Seconds the bundle's matrix products alone take for the whole training (see module doc)."""
    job, k = jobs[0], len(jobs)
    data = tasks.load(job.task, job.task_params, job.seed)
    dims = models.layer_dims(data.d_in, data.d_out, job.depth, job.width)
    weights = [torch.randn(k, b, a, device=device) for a, b in zip(dims, dims[1:])]
    train = [torch.randn(k, job.batch_size, d, device=device) for d in dims]
    val = [torch.randn(k, len(data.x_val), d, device=device) for d in dims]

    def step(acts: list[torch.Tensor], backward: bool) -> None:
        for i, w in enumerate(weights):
            torch.bmm(acts[i], w.transpose(1, 2))  # forward
            if backward:
                torch.bmm(acts[i + 1].transpose(1, 2), acts[i])  # weight gradient
                if i:
                    torch.bmm(acts[i + 1], w)  # input gradient (none for the data)

    def steps() -> None:
        for _ in range(FLOOR_STEPS):
            step(train, backward=True)

    steps()  # first calls: allocation and kernel selection
    per_step = min(seconds(steps, device) for _ in range(3)) / FLOOR_STEPS
    per_val = min(seconds(lambda: step(val, backward=False), device) for _ in range(3))
    n_log = len({*range(0, job.steps + 1, job.log_every), job.steps})
    return per_step * (job.steps + 1) + per_val * n_log


def test_speedup_over_classic_loop(benchmark, device, full):
    jobs = spec_jobs("target") if full else spec_jobs("target", steps=SHORT_STEPS)
    warm_torch_optim()

    def classic() -> None:
        for job in jobs:
            classic_loop.train_on(job, device)

    ours, theirs = interleaved(benchmark, lambda: engine.train(jobs, device=device), classic,
                               rounds=3, device=device)
    model_steps = len(jobs) * jobs[0].steps
    speedup = median(theirs) / median(ours)
    floor = matmul_floor(jobs, device)
    record(benchmark, device=device, K=len(jobs), steps=jobs[0].steps, classic_s=theirs,
           classic_median_s=median(theirs), engine_median_s=median(ours),
           engine_model_steps_per_s=model_steps / median(ours),
           classic_model_steps_per_s=model_steps / median(theirs),
           speedup=speedup, speedup_paired=paired_ratio(theirs, ours), matmul_floor_s=floor,
           engine_over_floor=median(ours) / floor, speedup_ceiling=median(theirs) / floor,
           target=TARGET, met=speedup >= TARGET)
