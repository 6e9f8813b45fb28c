"""``python benchmarks/scale.py [--out FILE.md]``: how initbench scales, as markdown tables.

1. Planning: a 10,000-job spec through ``python -m bench.sweep SPEC --dry-run``, timed as a
   whole process (target: under 5 s).
2. Results: 10,000 jobs' results (curves and layer traces every 10 of 300 steps, 16 layers)
   stored with ``Store.add`` and read back with ``bench.load``, each in its own process so
   that its peak RSS (``resource.getrusage``) is its own (target: under 30 s and 2 GB).
   The results are synthesized, not trained: random arrays of the engine's shapes and
   dtypes (``BundleOutput``) turned into ``JobResult`` by ``bench.record.from_bundle``
   itself, so the tables are exactly what a sweep stores. Synthesis is timed apart.
3. Report: ``bench.report.build`` (what ``python -m bench.report DIR`` and the end of a sweep
   run: load the store, draw every figure, write report.html and the data files) on the
   stores of step 2, timed in its own process with its peak RSS (target: under a minute).
4. Growth: time (best of 2) and peak memory of ``engine.train`` on real (small) bundles,
   varying jobs, depth, width and steps one at a time around the target shape.

Each measurement runs in a fresh subprocess (``python benchmarks/scale.py _<mode> ...``)
that prints one JSON line. Threads: OMP_NUM_THREADS (default 2) for every subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
THREADS = os.environ.get("OMP_NUM_THREADS") or os.environ.get("INITBENCH_BENCH_THREADS") or "2"

INITS = ["default", "kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal", "orthogonal",
         "zeros", "scaled_normal", "mean_field", "lsuv"]
# 10 inits x 10 depths x 10 learning rates x 10 seeds = 10,000 jobs in 10 shapes (one per depth),
# planned into 160 bundles of at most 64.
PLAN_SPEC = f"""
name = "plan10k"
[grid]
init = {json.dumps(INITS)}
depth = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
lr = [0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2]
seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""
# The stored-results workload: depth 16, 300 steps, probes every 10 steps.
RESULTS_SPEC = """
name = "results{n}"
[grid]
init = {inits}
lr = [0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2]
seed = {seeds}
{depth}
[train]
steps = 300
log_every = 10
"""
CHUNK = 100  # synthesized results per fake bundle
SECTIONS = ("plan", "results", "report", "growth")

BASE = {"K": 48, "depth": 6, "width": 64, "steps": 100}  # the target shape, 100 steps
GROWTH = {"K": [12, 24, 48, 96], "depth": [2, 4, 8, 16], "width": [16, 64, 256], "steps": [50, 100, 200]}


# --- measurements, each in its own process ------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _results_jobs(n: int, depths: list[int]):
    from bench import spec

    seeds = list(range(-(-n // (len(INITS) * 10 * len(depths)))))
    # One depth: a [model] setting, as the default workload always was; several: a grid axis.
    depth = f"depth = {depths}" if len(depths) > 1 else f"[model]\ndepth = {depths[0]}"
    text = RESULTS_SPEC.format(n=n, inits=json.dumps(INITS), seeds=json.dumps(seeds), depth=depth)
    sweep = spec.parse(text)
    # Grouped by depth, so that each synthesized bundle has one shape.
    return sorted(sweep.jobs(), key=lambda j: j.depth)[:n], sweep


def _fake_bundle(jobs, rng):
    """A BundleOutput with the engine's shapes and dtypes, filled with plausible random numbers."""
    import numpy as np

    from bench.schema import KINDS, STATS
    from bench.train import models, tasks
    from bench.train.bundle import BundleOutput
    from bench.train.stacked import trace_rows

    job, k = jobs[0], len(jobs)
    data = tasks.load(job.task, job.task_params, job.seed)
    log_steps = np.arange(0, job.steps + 1, job.log_every)
    n_log = len(log_steps)
    # Loss falls on a time scale set by the scheme, the learning rate and the seed (40 to ~800
    # steps), so that the report's rankings, heatmaps and profiles have differences to show.
    scale = np.array([40 * (0.2 / j.lr) ** 0.4 * (1 + 0.15 * INITS.index(j.init)) for j in jobs])
    decay = np.exp(-np.arange(job.steps + 1)[:, None] / (scale * rng.uniform(0.85, 1.15, k)))
    losses = (decay * rng.uniform(0.5, 1.5, k) + 0.01 * rng.random((job.steps + 1, k))).astype(np.float32)
    stats = rng.random((n_log, k, job.depth, len(KINDS), len(STATS)), dtype=np.float32)
    stats[:, :, :, :2, STATS.index("dead_frac")] = np.nan  # weights and biases have no dead units
    stats[:, :, :, 2:, STATS.index("grad_norm")] = np.nan  # activations have no gradient ...
    stats[:, :, :, 2:, STATS.index("update_ratio")] = np.nan  # ... or update
    stats[:, :, :, 3, STATS.index("dead_frac")] = np.nan
    stats[-1, :, :, :, STATS.index("update_ratio")] = np.nan  # no update after the last step
    rows, picks = trace_rows(job.depth)
    return BundleOutput(log_steps=log_steps, losses=losses, val_loss=losses[log_steps] * 1.1,
                        val_acc=np.full((n_log, k), np.nan, np.float32),
                        grad_norm=rng.random((n_log, k), dtype=np.float32), rows=rows,
                        row_stats=stats.reshape(n_log, k, -1, len(STATS))[:, :, picks].astype(np.float64),
                        modules=[], diverged_at=np.full(k, -1), init_loss=losses[0].copy(),
                        input_q=rng.uniform(0.9, 1.1, k).astype(np.float32), null_loss=np.ones(k),
                        dims=models.layer_dims(data.d_in, data.d_out, job.depth, job.width))


def _store(directory: str, n: int, depths: list[int]) -> dict:
    import numpy as np

    from bench import record, store

    jobs, sweep = _results_jobs(n, depths)
    env = record.environment("cpu")
    # The meta a sweep writes (bench.sweep), so that the report reads the grid's axes from it.
    meta = {"spec_text": sweep.text, "spec_path": "", "spec_name": sweep.name,
            "axes": [k for k, _ in sweep.grid], "env": env}
    db = store.Store.open(directory, fingerprint=sweep.fingerprint, meta=meta, fresh=True)
    rng = np.random.default_rng(0)
    synth = add = 0.0
    rows = {"curves": 0, "layers": 0}
    by_depth = [[j for j in jobs if j.depth == d] for d in sorted({j.depth for j in jobs})]
    for chunk in (group[i: i + CHUNK] for group in by_depth for i in range(0, len(group), CHUNK)):
        start = time.perf_counter()
        results = record.from_bundle(chunk, _fake_bundle(chunk, rng), sweep.metrics, 1.0, env)
        synth += time.perf_counter() - start
        start = time.perf_counter()
        for r in results:
            db.add(r)
            rows["curves"] += len(r.curves)
            rows["layers"] += len(r.layers)
        add += time.perf_counter() - start
    db.close()
    size = sum(p.stat().st_size for p in Path(directory).iterdir())
    return {"jobs": len(jobs), "store_s": add, "synth_s": synth, "peak_rss_mb": peak_rss_mb(),
            "file_mb": size / 2**20, **rows}


def _load(directory: str) -> dict:
    import bench

    before = peak_rss_mb()
    start = time.perf_counter()
    r = bench.load(directory)
    seconds = time.perf_counter() - start
    frames = {"runs": r.runs, "curves": r.curves, "layers": r.layers}
    return {"load_s": seconds, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before,
            "frames_mb": sum(f.memory_usage(deep=True).sum() for f in frames.values()) / 2**20,
            **{f"{k}_rows": len(v) for k, v in frames.items()}}


def _report(directory: str) -> dict:
    import logging

    from bench.report import build

    # The report's own per-part timings (logged at DEBUG), to show where the time goes.
    parts: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: parts.append(record.getMessage())
    logger = logging.getLogger("bench.report")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    start = time.perf_counter()
    path = build(directory)
    return {"report_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "html_mb": path.stat().st_size / 2**20, "log": parts}


def _train(settings: str) -> dict:
    # isort: off
    from bench import dispatch, spec
    from bench.train import stacked as engine  # bench before torch: its OpenMP setting, as in a sweep
    import torch
    # isort: on

    cfg = json.loads(settings)
    torch.set_num_threads(int(THREADS))
    dispatch.keep_freed_memory()  # as every process that trains a sweep's bundles does
    base = spec.load(HERE / "specs" / "target.toml").jobs()
    # K jobs: the target's 48, then the same grid with further seeds.
    jobs = [dataclasses.replace(base[i % len(base)], seed=base[i % len(base)].seed + 3 * (i // len(base)),
                                depth=cfg["depth"], width=cfg["width"], steps=cfg["steps"])
            for i in range(cfg["K"])]
    engine.train(jobs[:1], device="cpu")  # first-call costs (allocator, kernels) out of the figure
    ready = peak_rss_mb()
    times = []
    for _ in range(2):  # best of 2: a burst of load from another process hits one run, rarely both
        start = time.perf_counter()
        engine.train(jobs, device="cpu")
        times.append(time.perf_counter() - start)
    return {"train_s": min(times), "rss_before_mb": ready, "peak_rss_mb": peak_rss_mb()}


# --- the parent: run subprocesses, write tables -------------------------------------
def child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scale.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def process_seconds(args: list[str], repeat: int = 3) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return times


def planning_table(tmp: Path) -> list[str]:
    path = tmp / "plan10k.toml"
    path.write_text(PLAN_SPEC)
    rows = [("python -c pass", ["-c", "pass"]), ("python -c 'import torch'", ["-c", "import torch"]),
            ("bench.sweep SPEC --dry-run (10,000 jobs)",
             ["-m", "bench.sweep", str(path), "--dry-run", "--out", str(tmp / "plan")])]
    out = ["| process | best of 3 (s) | median (s) | target |", "|---|---|---|---|"]
    for name, args in rows:
        t = process_seconds(args)
        target = f"< 5 s: {'met' if min(t) < 5 else 'NOT met'}" if "dry-run" in name else ""
        out.append(f"| `{name}` | {min(t):.2f} | {statistics.median(t):.2f} | {target} |")
    return out


def results_table(tmp: Path, sizes: list[int], depths: list[int]) -> list[str]:
    out = ["| jobs | curve rows | layer rows | synthesize (s) | store (s) | store peak RSS (MB) | "
           "file (MB) | load (s) | load peak RSS (MB) | frames (MB) | store + load < 30 s, < 2 GB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        directory = tmp / f"results{n}"
        s = child("_store", str(directory), str(n), json.dumps(depths))
        ld = child("_load", str(directory))
        ok = s["store_s"] + ld["load_s"] < 30 and max(s["peak_rss_mb"], ld["peak_rss_mb"]) < 2048
        out.append(f"| {n:,} | {s['curves']:,} | {s['layers']:,} | {s['synth_s']:.1f} | {s['store_s']:.1f} | "
                   f"{s['peak_rss_mb']:.0f} | {s['file_mb']:.0f} | {ld['load_s']:.1f} | "
                   f"{ld['peak_rss_mb']:.0f} | {ld['frames_mb']:.0f} | "
                   f"{'met' if ok else 'NOT met'} ({s['store_s'] + ld['load_s']:.1f} s) |")
    return out


def report_table(tmp: Path, sizes: list[int], depths: list[int]) -> list[str]:
    out = ["| jobs | build report (s) | peak RSS (MB) | report.html (MB) | < 60 s |", "|---|---|---|---|---|"]
    notes = []
    for n in sizes:
        directory = tmp / f"results{n}"
        if not (directory / "store.sqlite").is_file():  # the results section was skipped
            child("_store", str(directory), str(n), json.dumps(depths))
        r = child("_report", str(directory))
        out.append(f"| {n:,} | {r['report_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['html_mb']:.1f} | "
                   f"{'met' if r['report_s'] < 60 else 'NOT met'} |")
        notes += [f"- {n:,} jobs: {line}" for line in r["log"]]
    return [*out, "", *notes]


def growth_table() -> list[str]:
    out = ["| varied | K | depth | width | steps | train (s) | model-steps/s | peak RSS (MB) | "
           "RSS growth in training (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for axis, values in GROWTH.items():
        for v in values:
            cfg = {**BASE, axis: v}
            r = child("_train", json.dumps(cfg))
            out.append(f"| {axis} | {cfg['K']} | {cfg['depth']} | {cfg['width']} | {cfg['steps']} | "
                       f"{r['train_s']:.2f} | {cfg['K'] * cfg['steps'] / r['train_s']:,.0f} | "
                       f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_before_mb']:.0f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    modes = {"_store": lambda a: _store(a[0], int(a[1]), json.loads(a[2])), "_load": lambda a: _load(a[0]),
             "_report": lambda a: _report(a[0]), "_train": lambda a: _train(a[0])}
    if argv and argv[0] in modes:
        print(json.dumps(modes[argv[0]](argv[1:])))
        return 0
    p = argparse.ArgumentParser(prog="python benchmarks/scale.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the tables to this markdown file")
    p.add_argument("--results", default="1000,10000", help="job counts for the store/load and report tables")
    p.add_argument("--depths", default="16",
                   help="depths of the stored-results workload (several: a grid axis, jobs spread over them)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(SECTIONS):
        p.error(f"--skip {args.skip}: unknown section(s) {sorted(skip - set(SECTIONS))}; "
                f"choose from {', '.join(SECTIONS)}")
    sizes = [int(n) for n in args.results.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    lines = [f"Measured {datetime.date.today()} on {platform.node()} ({os.cpu_count()} cores), "
             f"{THREADS} threads, Python {platform.python_version()}.", ""]
    with tempfile.TemporaryDirectory(prefix="initbench-scale-") as tmp:
        sections = [("plan", "Planning", lambda: planning_table(Path(tmp))),
                    ("results", f"Storing and loading results (depth {args.depths}, 300 steps, log_every 10)",
                     lambda: results_table(Path(tmp), sizes, depths)),
                    ("report", "Building the HTML report of those results",
                     lambda: report_table(Path(tmp), sizes, depths)),
                    ("growth", f"Growth around the target shape ({BASE})", growth_table)]
        for key, title, make in sections:
            if key not in skip:
                lines += [f"### {title}", "", *make(), ""]
                print(f"{title}: done", file=sys.stderr)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
