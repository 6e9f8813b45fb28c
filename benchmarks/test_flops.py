"""Achieved training FLOP/s as a fraction of the machine's own dense matmul FLOP/s.

specs/wide.toml: 16 jobs of width 256, batch 256, depth 6, one bundle. Achieved FLOP/s =
``planner.flops_per_step`` x steps x K / wall time (setup included). The yardsticks are
measured in the same run, between the engine's rounds, at the same thread count: a
1024 x 1024 ``torch.mm`` and a ``torch.bmm`` of the engine's own shape and the same total
size, (16, 256, 256) x (16, 256, 256). 20 steps here, 300 with ``--bench-full``; the
probed figure at 20 steps runs 3 probes in 21 steps (300 steps: 31 in 301), so it
slightly understates. Target: >= 60 % of the matmul rate.
"""

from __future__ import annotations

import torch

from bench import planner
from bench.train import stacked as engine
from bench.train import tasks
from benchmarks.conftest import interleaved, median, record, seconds, spec_jobs

SHORT_STEPS = 20
TARGET = 0.60
REPS = 5


def matmul_flops(device: str, shape: tuple[int, ...]) -> float:
    """Best FLOP/s of REPS products of two random tensors of ``shape`` (2-D: mm, 3-D: bmm)."""
    a, b = torch.randn(shape, device=device), torch.randn(shape, device=device)
    op = torch.mm if len(shape) == 2 else torch.bmm
    op(a, b)  # first call: allocation and kernel selection
    n = shape[-1]
    flops = 2.0 * n**3 * (shape[0] if len(shape) == 3 else 1)
    return flops / min(seconds(lambda: op(a, b), device) for _ in range(REPS))


def test_training_flops_vs_matmul(benchmark, device, full):
    jobs = spec_jobs("wide") if full else spec_jobs("wide", steps=SHORT_STEPS)
    job, k = jobs[0], len(jobs)
    data = tasks.load(job.task, job.task_params, job.seed)
    work = planner.flops_per_step(job, data.d_in, data.d_out) * job.steps * k
    peaks: dict[str, list[float]] = {"mm": [], "bmm": [], "probed_s": []}

    def yardsticks() -> None:
        peaks["mm"].append(matmul_flops(device, (1024, 1024)))
        peaks["bmm"].append(matmul_flops(device, (k, job.width, job.width)))
        peaks["probed_s"].append(seconds(lambda: engine.train(jobs, device=device, probes=True), device))

    ours, _ = interleaved(benchmark, lambda: engine.train(jobs, device=device, probes=False), yardsticks,
                          rounds=3, device=device)
    achieved = work / median(ours)
    achieved_probed = work / median(peaks["probed_s"][1:])  # the first setup ran before the warm-up round
    mm, bmm = median(peaks["mm"][1:]), median(peaks["bmm"][1:])
    record(benchmark, device=device, K=k, width=job.width, batch=job.batch_size, depth=job.depth,
           steps=job.steps, train_flops=work, achieved_gflops=achieved / 1e9,
           achieved_gflops_probed=achieved_probed / 1e9, mm_gflops=mm / 1e9, bmm_gflops=bmm / 1e9,
           fraction_of_mm=achieved / mm, fraction_of_bmm=achieved / bmm,
           fraction_of_mm_probed=achieved_probed / mm, target=TARGET, met=achieved / mm >= TARGET)
