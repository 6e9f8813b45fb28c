"""Engine throughput (model-steps per second) on the canonical sweep's bundle shapes.

sweeps/init.toml trains one bundle per depth: K = 60 jobs (5 inits x 4 learning rates
x 3 seeds), width 64, batch 128, probes every 10 steps. Throughput hardly depends on the
step count once the bundle is built, so the benchmark trains 30 steps (``--bench-full``: 300).
"""

from __future__ import annotations

import dataclasses

import pytest

from bench import spec
from bench.train import stacked as engine
from benchmarks.conftest import ROOT, median, record, timed_rounds

SHORT_STEPS = 30


@pytest.mark.parametrize("depth", [2, 4, 8, 16])
def test_engine_throughput(benchmark, device, full, depth):
    jobs = [j for j in spec.load(ROOT / "sweeps" / "init.toml").jobs() if j.depth == depth]
    steps = jobs[0].steps if full else SHORT_STEPS
    jobs = [dataclasses.replace(j, steps=steps) for j in jobs]
    benchmark.pedantic(engine.train, args=(jobs,), kwargs={"device": device}, rounds=3, warmup_rounds=1)
    seconds = median(timed_rounds(benchmark))
    record(benchmark, device=device, depth=depth, width=jobs[0].width, batch=jobs[0].batch_size,
           K=len(jobs), steps=steps, log_every=jobs[0].log_every,
           model_steps_per_s=len(jobs) * steps / seconds, ms_per_bundle_step=1e3 * seconds / steps)
