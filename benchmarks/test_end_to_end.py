"""Whole processes: ``python -m bench.sweep SPEC --no-report`` against ``benchmarks/classic_loop.py SPEC``.

Interpreter start, imports, planning, workers, training and writing results, each side
as a user runs it, best of 3, rounds interleaved, both with OMP_NUM_THREADS = the suite's
thread count. The step count matters here (start-up is a fixed cost), so only
``--bench-full`` (the issue's 300 steps) measures the target; the default 50 steps
tracks regressions. Target: >= 5x at 300 steps.

Also timed, best of 3: the sweep process's fixed start-up (``python -c`` importing what a
sweep imports: torch, pandas, pyarrow and bench), so that the figures say how much of
the sweep's time is left for planning, training and storing.
"""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.conftest import HERE, ROOT, SPECS, THREADS, interleaved, record, seconds

SHORT_STEPS = 50
TARGET = 5.0
STARTUP = "import bench.sweep, bench.dispatch, bench.store, bench.record"


def run(*args: str) -> None:
    # PYTHONPATH: classic_loop.py runs as a script and must find this checkout's bench package.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_end_to_end_speedup(benchmark, full, tmp_path):
    spec_path = SPECS / "target.toml"
    steps = 300
    if not full:
        steps = SHORT_STEPS
        spec_path = tmp_path / "target.toml"
        spec_path.write_text((SPECS / "target.toml").read_text().replace("steps = 300", f"steps = {steps}"))
    sweep = ["-m", "bench.sweep", str(spec_path), "--out", str(tmp_path / "sweep"), "--no-report", "--fresh"]
    classic = [str(HERE / "classic_loop.py"), str(spec_path), "--out", str(tmp_path / "classic.csv")]
    ours, theirs = interleaved(benchmark, lambda: run(*sweep), lambda: run(*classic),
                               rounds=3, warmup_rounds=0)
    speedup = min(theirs) / min(ours)
    startup = min(seconds(lambda: run("-c", STARTUP)) for _ in range(3))
    record(benchmark, steps=steps, jobs=48, sweep_best_s=min(ours), classic_best_s=min(theirs),
           classic_s=theirs, speedup_best_of_3=speedup, sweep_startup_s=startup,
           sweep_after_startup_s=min(ours) - startup, target=TARGET, met=bool(full and speedup >= TARGET))
