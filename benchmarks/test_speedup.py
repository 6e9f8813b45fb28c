"""The stacked engine against the classic loop on the target workload, in one process.

The issue's 48 jobs (specs/target.toml: 4 inits x 4 learning rates x 3 seeds; depth 6,
width 64, batch 128, probes every 10 steps) trained as one bundle, and the same jobs
trained one at a time by ``bench.reference.train_plain(record=True)``, rounds interleaved
and at the same thread count. Both sides build the same models, so the ratio hardly
depends on the step count: 50 steps here, 300 with ``--bench-full``. Target: >= 8x.
"""

from __future__ import annotations

from bench import engine
from benchmarks import classic_loop
from benchmarks.conftest import interleaved, median, paired_ratio, record, spec_jobs, warm_torch_optim

SHORT_STEPS = 50
TARGET = 8.0


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
    record(benchmark, device=device, K=len(jobs), steps=jobs[0].steps, classic_s=theirs,
           classic_median_s=median(theirs), engine_median_s=median(ours),
           engine_model_steps_per_s=model_steps / median(ours),
           classic_model_steps_per_s=model_steps / median(theirs),
           speedup=speedup, speedup_paired=paired_ratio(theirs, ours), target=TARGET, met=speedup >= TARGET)
