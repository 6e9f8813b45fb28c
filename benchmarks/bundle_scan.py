"""``python benchmarks/bundle_scan.py``: engine throughput by bundle size K, and the classic loop.

Trains bundles of K = 1, 2, 4, ... jobs of the target shape (specs/target.toml: depth 6,
width 64, batch 128, probes every 10 steps; jobs beyond the spec's 48 are the same grid
with further seeds), then the spec's 48 jobs one at a time with the classic loop on the
same device (``classic_loop.train_on``). Prints a markdown table and writes it, with the
raw figures as JSON, under ``--out``. ``gpu_check.sh`` runs it on CUDA; on the CPU it runs
too (small K), which is how it is checked without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import classic_loop  # the sibling script (this file runs as a script, from benchmarks/)
import torch

from bench import spec
from bench.spec import Job
from bench.train import stacked as engine

HERE = Path(__file__).resolve().parent


def jobs_for(k: int, steps: int) -> list[Job]:
    """K jobs of the target shape: the spec's 48, then the same grid with further seeds."""
    base = spec.load(HERE / "specs" / "target.toml").jobs()
    return [dataclasses.replace(base[i % len(base)], seed=base[i % len(base)].seed + 3 * (i // len(base)),
                                steps=steps) for i in range(k)]


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def scan(ks: list[int], steps: int, device: str, repeat: int) -> list[dict]:
    engine.train(jobs_for(2, 2), device=device)  # CUDA context, kernels, allocator: out of the figures
    rows = []
    for k in ks:
        jobs = jobs_for(k, steps)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        seconds = min(timed(lambda: engine.train(jobs, device=device), device)  # noqa: B023 - called now
                      for _ in range(repeat))
        no_probes = min(timed(lambda: engine.train(jobs, device=device, probes=False), device)  # noqa: B023
                        for _ in range(repeat))
        mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else float("nan")
        rows.append({"K": k, "steps": steps, "seconds": seconds, "model_steps_per_s": k * steps / seconds,
                     "ms_per_step": 1e3 * seconds / steps, "no_probes_seconds": no_probes,
                     "probe_overhead": seconds / no_probes - 1, "peak_gpu_mb": mem})
        print(f"K={k}: {seconds:.2f} s, {k * steps / seconds:,.0f} model-steps/s", file=sys.stderr,
              flush=True)
    return rows


def classic(n: int, steps: int, device: str) -> dict:
    jobs = jobs_for(n, steps)
    classic_loop.train_on(dataclasses.replace(jobs[0], steps=2), device)  # torch.optim's first step: imports
    seconds = timed(lambda: [classic_loop.train_on(j, device) for j in jobs], device)
    return {"jobs": n, "steps": steps, "seconds": seconds, "model_steps_per_s": n * steps / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bundle_scan.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ks", default="1,2,4,8,16,32,48,64,128,256,512,1024", help="bundle sizes")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--classic-jobs", type=int, default=48, help="jobs the classic loop trains (0: skip)")
    p.add_argument("--repeat", type=int, default=2, help="runs per K; the best counts")
    p.add_argument("--out", help="directory for bundle_scan.md and bundle_scan.json")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    rows = scan(ks, args.steps, args.device, args.repeat)
    base = classic(args.classic_jobs, args.steps, args.device) if args.classic_jobs else None
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    lines = [f"Device {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
             f"{args.steps} steps, probes every 10 steps.", "",
             "| K | s per bundle | model-steps/s | ms per bundle step | probe overhead | peak GPU MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mem = "-" if math.isnan(r["peak_gpu_mb"]) else f"{r['peak_gpu_mb']:.0f}"
        lines.append(f"| {r['K']} | {r['seconds']:.2f} | {r['model_steps_per_s']:,.0f} | "
                     f"{r['ms_per_step']:.2f} | {100 * r['probe_overhead']:.0f} % | {mem} |")
    if base:
        same = next((r for r in rows if r["K"] == base["jobs"]), None)
        best = max(rows, key=lambda r: r["model_steps_per_s"])
        lines += ["", f"Classic loop, {base['jobs']} jobs one at a time: {base['seconds']:.2f} s "
                  f"({base['model_steps_per_s']:,.0f} model-steps/s)."]
        if same:
            lines.append(f"Engine, the same {base['jobs']} jobs as one bundle: {same['seconds']:.2f} s, "
                         f"speed-up {base['seconds'] / same['seconds']:.1f}x.")
        lines.append(f"Best throughput at K = {best['K']}: {best['model_steps_per_s']:,.0f} model-steps/s, "
                     f"{best['model_steps_per_s'] / base['model_steps_per_s']:.1f}x the classic loop's.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bundle_scan.md").write_text(text + "\n")
        (out / "bundle_scan.json").write_text(json.dumps({"device": name, "scan": rows, "classic": base},
                                                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
