"""Running a sweep: plan, dispatch, store, resume, summarize; what ``bench.sweep`` and ``bench.regress`` call.

One function, :func:`run`, with the command line's choices as :class:`RunOptions`. It owns the
process-level behaviour of a long sweep: a SIGTERM stops dispatch and gives the bundles in
flight a grace period, Ctrl-C stops at once, and every finished job is stored before it returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bench.environment import environment
from bench.errors import EXIT_FAILED, EXIT_OK
from bench.schema import axis_column
from bench.settings import metrics_dict

EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM), what SLURM, Kubernetes and `timeout` send
# After SIGTERM, the bundles already running get this long to finish (and be stored) before they
# are abandoned; below the usual kill delays (SLURM KillWait and Kubernetes' grace: 30 s).
TERM_GRACE_S = float(os.environ.get("INITBENCH_TERM_GRACE_S", "20"))


class Abandoned(BaseException):
    """The grace period after SIGTERM ran out, or a second SIGTERM came: the bundles in flight are
    abandoned. A BaseException, so that no ``except Exception`` on the way (a job's error handling)
    takes it for a job's failure."""


@contextlib.contextmanager
def _sigterm_stops(stop: threading.Event, grace: float) -> Iterator[None]:
    """While inside: SIGTERM sets ``stop`` and starts the grace period, at whose end (or at a second
    SIGTERM) :class:`Abandoned` is raised in the main thread. Raised once at most: the cleanup it
    starts (killing workers, closing a cluster) is never itself interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are only ours to handle in the main thread
        return
    raised = False

    def abandon(signum: int, frame: object) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Abandoned

    def on_sigterm(signum: int, frame: object) -> None:
        if stop.is_set() or grace <= 0:
            abandon(signum, frame)
        stop.set()
        signal.setitimer(signal.ITIMER_REAL, grace)

    previous = signal.signal(signal.SIGTERM, on_sigterm), signal.signal(signal.SIGALRM, abandon)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGALRM, previous[1])


@dataclass(frozen=True)
class RunOptions:
    """How a sweep runs (the command-line flags of ``bench.sweep``; None: the spec's [runtime])."""

    out: Path | None = None  # default: reports/<spec name>/
    jobs: int | None = None
    backend: str | None = None
    scheduler: str | None = None
    devices: str | None = None
    fresh: bool = False
    dry_run: bool = False
    no_report: bool = False
    quiet: bool = False

    @classmethod
    def from_args(cls, args: Any) -> RunOptions:
        """The run flags parsed by a command (``cli.add_run_flags``); flags it lacks keep their defaults."""
        given = {f.name: getattr(args, f.name) for f in fields(cls)
                 if getattr(args, f.name, None) is not None}
        if given.get("out") is not None:
            given["out"] = Path(given["out"])
        return cls(**given)


def run(spec_path: str | Path, options: RunOptions = RunOptions()) -> int:
    """Sweep a spec file into its output directory (resuming what is stored); the exit code.

    Returns 0 done (diverged jobs are results), 1 some jobs failed, 130 interrupted (Ctrl-C),
    143 terminated (SIGTERM; see ``TERM_GRACE_S``). Raises UserError for bad input: an invalid spec,
    an output directory another sweep is writing, a damaged store, a store that cannot be written.
    """
    stop = threading.Event()
    try:
        with _sigterm_stops(stop, TERM_GRACE_S):
            return _sweep(str(spec_path), options, stop)
    except Abandoned:
        sys.stderr.write(f"terminated: the bundles still running {TERM_GRACE_S:g} s after SIGTERM were "
                         "abandoned; every job finished before is stored; rerun the same command to "
                         "resume\n")
        return EXIT_TERMINATED


def _sweep(spec_path: str, args: RunOptions, stop: threading.Event) -> int:
    from bench import planner, spec, store

    sweep = spec.load(spec_path)
    jobs = sweep.jobs()
    spec.check_models(jobs, str(spec_path))
    runtime = sweep.runtime
    devices = planner.parse_devices(args.devices or runtime.devices)
    backend = args.backend or runtime.backend
    out = Path(args.out) if args.out else default_out(sweep.name)

    if args.dry_run:
        bundles, workers = _plan(jobs, devices, runtime, args.jobs, backend)
        print(f"{sweep.name}: {len(jobs)} jobs in {len(bundles)} bundles on {','.join(devices)}, "
              f"{workers or 'no'} worker processes; results -> {out}")
        return EXIT_OK

    from bench import dispatch  # torch: only a sweep that trains needs it

    meta = {"spec_text": sweep.text, "spec_path": sweep.path, "spec_name": sweep.name,
            "axes": [axis_column(k) for k, _ in sweep.grid],
            "metrics": metrics_dict(sweep.metrics), "regression": dict(sweep.regression),
            "env": environment(",".join(devices))}
    db = store.Store.open(out, fingerprint=sweep.fingerprint, meta=meta, fresh=args.fresh)
    counts = {"ok": 0, "diverged": 0, "failed": 0}
    bar = None
    try:
        done = db.finished()
        bundles, workers = _plan([j for j in jobs if j.job_id not in done], devices, runtime, args.jobs,
                                 backend)
        start = time.perf_counter()
        bar = None if args.quiet else _progress(len(jobs), len(done))
        results = dispatch.execute(bundles, sweep.metrics, workers=workers, backend=backend,
                                   scheduler=args.scheduler, stop=stop)
        # closing(): whatever ends the loop (Ctrl-C, a store that cannot be written, the grace period
        # running out) closes the dispatch, which kills its workers rather than leaving them behind.
        with contextlib.closing(results):
            for result in results:
                db.add(result)
                counts[result.status] += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(diverged=counts["diverged"], failed=counts["failed"], refresh=False)
        if bar is not None:
            bar.close()
        stored = db.count()
        if stop.is_set():
            sys.stderr.write(f"terminated: {stored} of {len(jobs)} jobs stored in {out} (every job in flight "
                             f"finished within the grace period); rerun the same command to resume\n")
            return EXIT_TERMINATED
        db.set_meta("wall_s", f"{time.perf_counter() - start:.3f}")
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        sys.stderr.write(f"interrupted: {sum(counts.values())} jobs stored in {out} in this run; "
                         f"rerun the same command to resume\n")
        return EXIT_INTERRUPTED
    finally:
        if bar is not None:
            bar.close()
        db.close()

    if not args.quiet:
        _print_summary(out, len(done), counts)
    if not args.no_report:
        write_report(out, args.quiet)
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def _plan(jobs: list, devices: list[str], runtime, jobs_flag: int | None, backend: str) -> tuple[list, int]:
    """Bundles and worker count: the workers depend on the work, and the bundles on the workers."""
    from bench import planner

    first = planner.plan(jobs, devices, max_bundle=runtime.max_bundle, memory_mb=runtime.memory_mb)
    workers = planner.choose_workers(first, devices, jobs_flag or runtime.jobs)
    if backend == "dask" and not workers and jobs:
        workers = 2  # a local dask cluster of two worker processes (an existing one uses all of its)
    bundles = planner.plan(jobs, devices, max_bundle=runtime.max_bundle, memory_mb=runtime.memory_mb,
                            workers=max(workers, 1))
    return bundles, workers


def default_out(name: str) -> Path:
    """Where a sweep named ``name`` writes by default: ``reports/<name>/`` (name made path-safe)."""
    return Path("reports") / _safe_name(name)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "sweep"


def _progress(total: int, done: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="job", file=sys.stderr, dynamic_ncols=True,
                desc="sweep")


def _print_summary(out: Path, resumed: int, counts: dict[str, int]) -> None:
    from bench.store import load

    results = load(out, traces=False)
    runs = results.runs
    print(f"\n{len(runs)} jobs in {out}: " + ", ".join(f"{v} {k}" for k, v in
                                                      runs["status"].value_counts().items())
          + (f" ({resumed} from an earlier run)" if resumed else ""))
    ok = runs[runs["status"] != "failed"]
    if len(ok):
        print(best_schemes(ok, results.axes))
    failed = runs[runs["status"] == "failed"]
    for _, row in failed.head(5).iterrows():
        print(f"failed {row['job_id']}: {row['error']}", file=sys.stderr)


SUMMARY_ROWS = 20  # the closing table stays a glance; the report has every cell


def best_schemes(runs, axes: Sequence[str]) -> str:
    """The closing table: per cell of the sweep's non-seed axes, the scheme with the fewest median steps.

    Scheme columns (``init`` and its parameters' axes, ``init.<param>``) name the scheme; every other
    axis is a cell. Never reaching the target counts as infinitely slow; ties go to the lower median
    final loss.
    """
    axes = [a for a in dict.fromkeys(axes) if a != "seed" and a in runs]
    scheme = [a for a in axes if a == "init" or a.startswith("init.")] or ["init"]
    cell = [a for a in axes if a not in scheme]
    table = (runs.assign(steps=runs["steps_to_target"].fillna(float("inf")))
             .groupby(cell + scheme, dropna=False)
             .agg(steps=("steps", "median"), loss=("final_loss", "median"))
             .reset_index().sort_values([*cell, "steps", "loss"]))
    best = table.groupby(cell, dropna=False).head(1) if cell else table.head(1)
    best = best.assign(steps=best["steps"].map(lambda v: "never" if v == float("inf") else f"{v:g}"))
    shown = best.rename(columns={"steps": "steps_to_target", "loss": "final_loss"})
    title = (f"best init per {', '.join(cell)}" if cell else "best init") + \
        " (median steps_to_target over seeds; median final loss):"
    extra = len(shown) - SUMMARY_ROWS
    more = f"\n... {extra} more rows in report.html" if extra > 0 else ""
    return f"{title}\n{shown.head(SUMMARY_ROWS).to_string(index=False)}{more}"


def write_report(out: Path, quiet: bool = False) -> None:
    """Build ``out/report.html`` if the report package is importable; print its path unless quiet."""
    try:
        from bench.report import build
    except ImportError:
        return  # the report package is optional while it is being built
    path = build(out)
    if not quiet:
        print(f"report: {path}")
