"""Probe cost of the engine for any module on a model with over 100 modules (issue 13: <= 25 %).

``python benchmarks/anymodule_probes.py``: a 32-block residual MLP (162 catalogued modules),
K = 8 jobs, 40 steps, probes every 10; the median over 3 interleaved rounds of training with
probes over training without them, in one process. Measured 2026-11-30 on the shared 2-core
machine while other work ran: 10.9 %.
"""

import textwrap
import time

import numpy as np
import torch

from bench import spec
from bench.train import functional, tasks
from bench.train.bundle import build_model

SPEC = textwrap.dedent("""
[grid]
init = ["default"]
seed = [0, 1, 2, 3, 4, 5, 6, 7]
[model]
arch = "resmlp"
depth = 32
width = 64
[task]
name = "teacher"
[train]
steps = 40
batch_size = 64
log_every = 10
""")


def main() -> None:
    torch.set_num_threads(1)
    jobs = spec.parse(SPEC).jobs()
    model = build_model(jobs[0], tasks.load(jobs[0].task, jobs[0].task_params, 0))
    blocks = sum(1 for n, _ in model.named_modules() if functional.BLOCK.fullmatch(n))
    print("modules in catalog:", len(functional.catalog(model)) + blocks)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for probes in (False, True):
            start = time.perf_counter()
            functional.train(jobs, probes=probes, vectorize=True)
            times[probes].append(time.perf_counter() - start)
    on, off = np.median(times[True]), np.median(times[False])
    print(f"probes on {on:.2f}s off {off:.2f}s: probe cost {100 * (on / off - 1):.1f}% of training time "
          "(log_every 10, K=8)")


if __name__ == "__main__":
    main()
