"""What the probes cost: the target bundle trained with and without them, at log_every = 10.

Overhead = (time with probes) / (time without) - 1, the median of back-to-back pairs.
The probes are what watches every layer: statistics of weights, biases, gradients,
update sizes, activations and preactivations, and the gradient norm. Both sides compute
the validation loss every 10th step, as any training that records a curve does.
Probes run every 10th step whatever the run length, so 50 steps stand for 300
(``--bench-full``). Target: <= 15 %.
"""

from __future__ import annotations

from bench.train import stacked as engine
from benchmarks.conftest import interleaved, median, paired_ratio, record, spec_jobs

SHORT_STEPS = 50
TARGET = 0.15


def test_probe_overhead(benchmark, device, full):
    jobs = spec_jobs("target") if full else spec_jobs("target", steps=SHORT_STEPS)
    with_probes, without = interleaved(benchmark, lambda: engine.train(jobs, device=device, probes=True),
                                       lambda: engine.train(jobs, device=device, probes=False),
                                       rounds=5, device=device)
    overhead = paired_ratio(with_probes, without) - 1
    steps = jobs[0].steps
    record(benchmark, device=device, K=len(jobs), steps=steps, log_every=jobs[0].log_every,
           ms_per_step_probes=1e3 * median(with_probes) / steps,
           ms_per_step_no_probes=1e3 * median(without) / steps, no_probes_s=without,
           overhead=overhead, overhead_of_medians=median(with_probes) / median(without) - 1,
           target=TARGET, met=overhead <= TARGET)
