"""Any module: K jobs as one vmap bundle against the same K jobs one at a time, in one process.

Three shapes, each at K = 1, 8 and 32 jobs (Adam, 4 learning rates x K/4 seeds, 20 steps or
100 with ``--bench-full``, probes and validation every 10 steps):

- ``resmlp``: residual MLP, depth 8, width 64, on ``teacher`` (batch 128);
- ``cnn``: depth 3, width 16, on ``digits`` as (1, 8, 8) images (batch 64);
- ``transformer``: depth 2, width 32, 2 heads, on ``markov`` (seq_len 16, vocab 16; batch 32).

Four ways to train the same jobs, timed round by round in this order, the bundle last:

- ``plain``: ``bench.train.reference.train_plain(record=True)`` per job (``nn.Module`` +
  ``torch.optim``; on a GPU ``benchmarks.classic_loop.train_on``, the same loop on the device);
- ``loop``: ``functional.train(jobs, vectorize=False)``, the engine's per-job fallback;
- ``auto``: ``functional.train(jobs)``: the preflight decides (what a sweep gets);
- ``vmap``: ``functional.train(jobs, vectorize=True)``, the timed side, forced even where the
  preflight would fall back (on the CPU the transformer's flash attention has no batching
  rule: vmap loops over the jobs for that operator).

The engine does a little more than the plain loop: one more forward and backward (the losses
after the last update), the validation loss at every logged step and the full probes
(module outputs included). The speed-up is ``plain / bundle``, medians over the rounds.
Targets (issue 13): residual MLP >= 3x and CNN >= 1.3x at K = 32; no bundle slower than
its jobs one at a time.

A table of a saved run: ``python -m benchmarks.test_anymodule RESULTS.json`` (a
``--benchmark-json`` file or an autosave), from the repository root. Given several runs, it
also prints the best round of each side over all of them: on a shared machine other work
slows the plain loop far more than a bundle, so loaded runs' medians overstate the speed-up.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable

import pytest

from bench import spec
from bench.spec import Job
from bench.train import functional
from benchmarks import classic_loop
from benchmarks.conftest import (
    median,
    paired_ratio,
    record,
    seconds,
    sync,
    timed_rounds,
    warm_torch_optim,
)

STEPS = 20
FULL_STEPS = 100  # --bench-full: fixed costs (building, catalogue, preflight) weigh less
LOG_EVERY = 10
ROUNDS = 3
KS = (1, 8, 32)
LRS = (1e-3, 3e-3, 1e-2, 3e-4)
MODELS = {
    "resmlp": 'arch = "resmlp"\ndepth = 8\nwidth = 64\n[task]\nname = "teacher"\n[train]\nbatch_size = 128\n',
    "cnn": 'arch = "cnn"\ndepth = 3\nwidth = 16\n[task]\nname = "digits"\nimages = true\n'
           '[train]\nbatch_size = 64\n',
    "transformer": 'arch = "transformer"\ndepth = 2\nwidth = 32\nheads = 2\n[task]\nname = "markov"\n'
                   'seq_len = 16\nvocab = 16\n[train]\nbatch_size = 32\n',
}
# The MLP is trained by the hand-stacked engine; test_mlp_stacked_engine_vs_vmap compares the two engines.
SHAPES = {**MODELS, "mlp": 'arch = "mlp"\ndepth = 8\nwidth = 64\n[task]\nname = "teacher"\n'
                           '[train]\nbatch_size = 128\n'}
TARGETS = {("resmlp", 32): 3.0, ("cnn", 32): 1.3}
SIDES = ("plain", "loop", "auto")  # timed before each round of the bundle, in this order


def model_jobs(model: str, k: int, steps: int = STEPS) -> list[Job]:
    """K jobs of one shape: ``min(K, 4)`` Adam learning rates x ``K / that`` seeds."""
    lrs = list(LRS[:min(k, len(LRS))])
    text = (f"[grid]\nlr = {lrs}\nseed = {list(range(k // len(lrs)))}\n[model]\n{SHAPES[model]}"
            f'steps = {steps}\nlog_every = {LOG_EVERY}\noptimizer = "adam"\n')
    jobs = spec.parse(text, f"<anymodule {model}>").jobs()
    assert len(jobs) == k, (model, k, len(jobs))
    return jobs


def quiet(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` without vmap's warnings (one per operator it has no batching rule for)."""
    def run() -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    return run


def sides(jobs: list[Job], device: str, engines: list[str] | None = None) -> dict[str, Callable[[], object]]:
    """The four ways to train ``jobs``; ``engines`` collects what the preflight chose (and why)."""
    def chosen(engine: str, reason: str) -> None:
        if engines is not None and not engines:
            engines.append(f"{engine}: {reason}" if reason else engine)

    return {
        "plain": lambda: [classic_loop.train_on(job, device) for job in jobs],
        "loop": quiet(lambda: functional.train(jobs, device=device, vectorize=False)),
        "auto": quiet(lambda: functional.train(jobs, device=device, on_engine=chosen)),
        "vmap": quiet(lambda: functional.train(jobs, device=device, vectorize=True)),
    }


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("model", list(MODELS))
def test_anymodule_bundle_vs_plain_loop(benchmark, device, full, model, k):
    steps = FULL_STEPS if full else STEPS
    jobs = model_jobs(model, k, steps)
    warm_torch_optim()
    for fn in sides(model_jobs(model, 2, steps=2), device).values():  # first calls of each path
        fn()
    engines: list[str] = []
    ways = sides(jobs, device, engines)
    times: dict[str, list[float]] = {side: [] for side in SIDES}

    def setup() -> None:
        for side in SIDES:
            times[side].append(seconds(ways[side], device))

    def run() -> None:
        ways["vmap"]()
        sync(device)

    load_before = os.getloadavg()[0]
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=0)
    load_after = os.getloadavg()[0]
    times["vmap"] = timed_rounds(benchmark)
    med = {side: median(t) for side, t in times.items()}
    target = TARGETS.get((model, k))
    speedup = med["plain"] / med["vmap"]
    record(benchmark, device=device, model=model, K=k, steps=steps, rounds=ROUNDS,
           load_1min=[load_before, load_after],  # other work on the machine inflates the plain loop most
           **{f"{side}_s": times[side] for side in (*SIDES, "vmap")},
           **{f"{side}_median_s": med[side] for side in (*SIDES, "vmap")},
           auto_engine=engines[0] if engines else "",
           speedup_vmap=speedup, speedup_vmap_paired=paired_ratio(times["plain"], times["vmap"]),
           speedup_auto=med["plain"] / med["auto"],
           speedup_auto_paired=paired_ratio(times["plain"], times["auto"]),
           speedup_loop=med["plain"] / med["loop"],
           vmap_over_loop=med["loop"] / med["vmap"],
           vmap_not_slower=speedup >= 1.0, auto_not_slower=med["plain"] / med["auto"] >= 1.0,
           target=target, met=None if target is None else speedup >= target)


@pytest.mark.parametrize("k", (8, 32))
def test_mlp_stacked_engine_vs_vmap(benchmark, device, full, k):
    """The hand-stacked MLP engine against the any-module vmap engine on the same MLP jobs (issue 13:
    keep the stacked engine only where it measurably wins). Timed side: ``stacked.train``."""
    from bench.train import stacked

    steps = FULL_STEPS if full else STEPS
    jobs = model_jobs("mlp", k, steps)
    for fn in (lambda: stacked.train(jobs[:2], device=device),
               quiet(lambda: functional.train(jobs[:2], device=device, vectorize=True))):
        fn()
    vmap_times: list[float] = []
    vmapped = quiet(lambda: functional.train(jobs, device=device, vectorize=True))
    benchmark.pedantic(lambda: (stacked.train(jobs, device=device), sync(device)),
                       setup=lambda: vmap_times.append(seconds(vmapped, device)), rounds=ROUNDS,
                       warmup_rounds=0)
    stacked_times = timed_rounds(benchmark)
    record(benchmark, device=device, model="mlp", K=k, steps=steps, rounds=ROUNDS, stacked_s=stacked_times,
           vmap_s=vmap_times, stacked_over_vmap=median(vmap_times) / median(stacked_times),
           stacked_over_vmap_paired=paired_ratio(vmap_times, stacked_times))


def table(results: dict) -> str:
    """The markdown table of a pytest-benchmark JSON file's ``test_anymodule`` results."""
    mlp = [b["extra_info"] for b in results["benchmarks"] if b["name"].startswith("test_mlp_stacked")]
    rows = [b["extra_info"] for b in results["benchmarks"] if b["name"].startswith("test_anymodule")]
    rows.sort(key=lambda e: (list(MODELS).index(e["model"]), e["K"]))
    if not rows and not mlp:
        return "no test_anymodule results in this file\n"
    head = (rows or mlp)[0]
    lines = [f"device {head['device']}, {head['threads']} threads, torch {head['torch']}, "
             f"{head['steps']} steps, median of {head['rounds']} rounds (seconds per bundle of K jobs)",
             "",
             "| model | K | plain loop (s) | `vectorize=False` (s) | auto (s) | `vectorize=True` (s) "
             "| speed-up vmap | speed-up auto | vmap / loop | auto engine | load | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in rows:
        load = "-".join(f"{x:.1f}" for x in e.get("load_1min", []))
        target = "" if e["target"] is None else f">= {e['target']}x: {'met' if e['met'] else 'not met'}"
        lines.append(
            f"| {e['model']} | {e['K']} | {e['plain_median_s']:.2f} | {e['loop_median_s']:.2f} "
            f"| {e['auto_median_s']:.2f} | {e['vmap_median_s']:.2f} | **{e['speedup_vmap']:.2f}x** "
            f"(paired {e['speedup_vmap_paired']:.2f}x) | {e['speedup_auto']:.2f}x "
            f"| {e['vmap_over_loop']:.2f}x "
            f"| {e['auto_engine'].split(':')[0]} | {load} | {target} |")
    if mlp:
        lines += ["", "MLP (depth 8, width 64, teacher, batch 128): the hand-stacked engine against vmap", "",
                  "| K | stacked (s) | vmap (s) | stacked faster by |", "|---|---|---|---|"]
        lines += [f"| {e['K']} | {median(e['stacked_s']):.3f} | {median(e['vmap_s']):.3f} "
                  f"| **{e['stacked_over_vmap']:.2f}x** (paired {e['stacked_over_vmap_paired']:.2f}x) |"
                  for e in sorted(mlp, key=lambda e: e["K"])]
    return "\n".join(lines) + "\n"


def best_table(files: list[dict]) -> str:
    """The best round of each side over every run given (closest to an idle machine), as markdown."""
    best: dict[tuple[str, int, int], dict[str, float]] = {}  # (model, K, steps): runs of one length
    for results in files:
        for b in results["benchmarks"]:
            if not b["name"].startswith("test_anymodule"):
                continue
            e = b["extra_info"]
            cell = best.setdefault((e["model"], e["K"], e["steps"]), {})
            for side in (*SIDES, "vmap"):
                rounds = e.get(f"{side}_s") or []
                if rounds:
                    cell[side] = min(cell.get(side, float("inf")), *rounds)
    lines = [f"best round of each side over {len(files)} run(s) (seconds per bundle of K jobs)", "",
             "| model | K | steps | plain loop (s) | `vectorize=False` (s) | auto (s) | `vectorize=True` (s) "
             "| speed-up vmap | speed-up auto | vmap / loop |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(best, key=lambda cell: (cell[2], list(MODELS).index(cell[0]), cell[1]))
    for (model, k, steps), c in ((cell, best[cell]) for cell in order):
        lines.append(f"| {model} | {k} | {steps} | {c['plain']:.3f} | {c['loop']:.3f} | {c['auto']:.3f} "
                     f"| {c['vmap']:.3f} | **{c['plain'] / c['vmap']:.2f}x** | {c['plain'] / c['auto']:.2f}x "
                     f"| {c['loop'] / c['vmap']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    runs = []
    for path in sys.argv[1:]:
        with open(path) as f:
            runs.append(json.load(f))
        print(f"{path}: {table(runs[-1])}")
    if len(runs) > 1:
        print(best_table(runs), end="")
