"""``python benchmarks/profile_engine.py [--steps N] [--threads T]``: where a bundle's time goes.

Trains the target bundle (specs/target.toml: 48 jobs, depth 6, width 64, batch 128,
probes every 10 steps) twice: under cProfile, reporting each phase of ``engine.train``
as a share of the whole (by cumulative time of the engine's own functions), and under
``torch.profiler``, reporting the operators with the most self CPU time. Phases overlap
where one calls another (the probe's validation pass runs ``forward``); the table says so.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import sys
import time
from pathlib import Path

import torch

from bench import spec
from bench.train import stacked as engine

HERE = Path(__file__).resolve().parent

# (label, file suffix, function name): the phases of engine.train, by the functions that run them
PHASES = [
    ("whole engine.train", "bench/train/stacked.py", "train"),
    ("build models (nn.Sequential + init)", "bench/train/bundle.py", "build_model"),
    ("load task data", "bench/tasks.py", "load"),
    ("forward, training and validation (engine.forward)", "bench/train/stacked.py", "forward"),
    ("backward (Tensor.backward)", "torch/_tensor.py", "backward"),
    ("optimizer step (FlatOptimizer.step)", "bench/train/optim.py", "step"),
    ("probe statistics (probe)", "bench/train/probes.py", "probe"),
    ("  of which stats", "bench/train/probes.py", "stats"),
    ("loss (loss_per_job)", "bench/train/bundle.py", "loss_per_job"),
    ("parameter copies for update ratios (clone)", "~", "<method 'clone' of 'torch._C.TensorBase' objects>"),
]


def phases(stats: pstats.Stats) -> list[tuple[str, float, int]]:
    table = stats.stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, nc, tt, ct, callers)}
    out = []
    for label, suffix, name in PHASES:
        hits = [(v[3], v[1]) for (f, _, n), v in table.items() if n == name and f.endswith(suffix)]
        out.append((label, sum(h[0] for h in hits), sum(h[1] for h in hits)))
    # engine.train's own lines: the step loop's Python and the tensor ops it runs inline
    # (indexing the batch, torch.where, the divergence check), which cProfile cannot name.
    own = sum(v[2] for (f, _, n), v in table.items() if n == "train" and f.endswith("bench/train/stacked.py"))
    out.append(("engine.train's own lines (batch gather, divergence check, loop)", own, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/profile_engine.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15, help="operators listed from torch.profiler")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = spec.load(HERE / "specs" / "target.toml").jobs()
    jobs = [dataclasses.replace(j, steps=args.steps) for j in target]
    engine.train(jobs[:2], device="cpu")  # first-call costs out of the profile

    start = time.perf_counter()
    engine.train(jobs)
    plain = time.perf_counter() - start
    prof = cProfile.Profile()
    prof.runcall(engine.train, jobs)
    stats = pstats.Stats(prof)
    rows = phases(stats)
    total = rows[0][1]
    print(f"target bundle: {len(jobs)} jobs, {args.steps} steps, {args.threads} threads; "
          f"{plain:.2f} s unprofiled, {total:.2f} s under cProfile\n")
    print("| phase | seconds | share | calls |\n|---|---|---|---|")
    for label, seconds, calls in rows:
        print(f"| {label} | {seconds:.3f} | {100 * seconds / total:.1f} % | {calls} |")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        engine.train(jobs)
    events = sorted(tp.key_averages(), key=lambda e: -e.self_cpu_time_total)
    whole = sum(e.self_cpu_time_total for e in events)
    print(f"\ntorch.profiler, top {args.top} operators by self CPU time "
          f"(of {whole / 1e6:.2f} s in operators)\n")
    print("| operator | self CPU (s) | share | calls |\n|---|---|---|---|")
    for e in events[: args.top]:
        share = 100 * e.self_cpu_time_total / whole
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.3f} | {share:.1f} % | {e.count} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
