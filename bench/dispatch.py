"""Running planned bundles (:mod:`bench.planner`) through joblib, on their devices.

This is the one place where work is dispatched: one ``Parallel(...)`` call,
its configuration logged once, every returned value type-checked. Workers
return :class:`~bench.record.JobResult` lists; the caller (the parent) stores
them as they arrive, so a killed sweep loses only the bundles in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator

import torch
from joblib import Parallel, delayed, parallel_config
from joblib.externals.loky import get_reusable_executor
from joblib.externals.loky.process_executor import BrokenProcessPool

from bench import record
from bench.environment import environment
from bench.errors import UserError
from bench.job import Job
from bench.planner import Bundle
from bench.record import JobResult
from bench.settings import MetricsConfig
from bench.train import functional
from bench.train.stacked import train

log = logging.getLogger(__name__)
BACKENDS = ("loky", "dask", "threading")
# Seconds a dask cluster may have no worker at all before the sweep gives up waiting for one.
DASK_GRACE_S = float(os.environ.get("INITBENCH_DASK_GRACE_S", "60"))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


@functools.cache  # once per process
def keep_freed_memory() -> None:
    """Let this process reuse the memory it frees instead of handing it back to the system (glibc).

    A training step allocates and frees the same few-MB tensors over and over; by default glibc
    returns such blocks to the system and every next step page-faults them back in, zeroed.
    That cost about 10 % of a bundle's step on our 2-core VM (docs/performance.md). The process
    then keeps its peak heap until it exits, which a sweep or worker process does anyway.
    No-op where the C library has no ``mallopt`` (macOS, musl).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_TRIM_THRESHOLD, 2**30)  # keep up to 1 GiB of freed heap
    mallopt(_M_MMAP_THRESHOLD, 2**28)  # blocks below 256 MiB come from the heap, not fresh mappings


def run_bundle(jobs: tuple[Job, ...], cfg: MetricsConfig, device: str, threads: int,
               note: str = "") -> list[JobResult]:
    """Train one bundle in this process and return its results; never raises for a job's error.

    Out of device memory, the bundle is split in halves and each half retried (down to single
    jobs). Any other error retries the jobs one at a time, so one bad job cannot take its
    bundle-mates down; a job that still raises becomes a ``failed`` row with its error. ``note``
    says why this bundle is a retry; it leads the runs' ``engine_note``.
    """
    keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    env = environment(device)
    start = time.perf_counter()
    try:
        if jobs[0].arch == "mlp":
            out = train(list(jobs), divergence_ratio=cfg.divergence_ratio, device=device)
            return record.from_bundle(list(jobs), out, cfg, time.perf_counter() - start,
                                      {**env, "engine": "stacked", **({"engine_note": note} if note else {})})
        used: dict[str, str] = {}

        def on_engine(name: str, why: str) -> None:
            # A retried job is "a bundle of one" because of the retry: say so first.
            why = "" if note and why == "a bundle of one job" else why
            used.update(engine=name, engine_note="; ".join(w for w in (note, why) if w))

        outs = functional.train(list(jobs), divergence_ratio=cfg.divergence_ratio, device=device,
                                on_engine=on_engine)
        per = [list(jobs)] if len(outs) == 1 else [[j] for j in jobs]
        wall = (time.perf_counter() - start) / len(outs)
        return [r for group, out in zip(per, outs)
                for r in record.from_bundle(group, out, cfg, wall, {**env, **used})]
    except torch.OutOfMemoryError as err:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if len(jobs) > 1:
            half, why = len(jobs) // 2, f"split from a bundle of {len(jobs)} out of memory"
            first = run_bundle(jobs[:half], cfg, device, threads, why)
            return first + run_bundle(jobs[half:], cfg, device, threads, why)
        return [record.failed(jobs[0], f"out of memory on {device} even alone: {_first_line(err)}", env,
                              time.perf_counter() - start)]
    except Exception as err:  # noqa: BLE001 - any error in user data or training is the job's result
        if len(jobs) > 1:
            why = f"retried alone: its bundle raised {type(err).__name__}: {_first_line(err)[:160]}"
            return [r for job in jobs for r in run_bundle((job,), cfg, device, threads, why)]
        log.debug("job %s failed:\n%s", jobs[0].job_id, traceback.format_exc())
        return [record.failed(jobs[0], f"{type(err).__name__}: {_first_line(err)}",
                              {**env, "engine_note": note} if note else env, time.perf_counter() - start)]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class WorkerCrash(Exception):
    """A worker process died (segfault, ``os._exit``, OOM kill) while bundles were in flight."""

    def __init__(self, cause: str, suspects: list[Bundle], untouched: list[Bundle]):
        super().__init__(cause)
        self.cause, self.suspects, self.untouched = cause, suspects, untouched


def _crash_cause(err: BaseException) -> str:
    # loky says e.g. "... The exit codes of the workers are {EXIT(3)}" or "{SIGKILL(-9)}".
    codes = re.search(r"exit codes of the workers are \{([^}]*)\}", str(err))
    if not codes:
        return f"worker process died ({type(err).__name__}: {_first_line(err)})"
    parts = []
    for code in codes.group(1).split(","):
        m = re.match(r"\s*(\w+)\((-?\d+)\)", code)
        if m and m.group(1) == "EXIT":
            parts.append(f"worker exited with code {m.group(2)}")
        elif m:
            parts.append(f"worker killed by {m.group(1)}")
    return "; ".join(parts) or "worker process died"


class _Dask:
    """A dask.distributed client for one sweep, and a watchdog for a cluster that lost every worker.

    joblib's dask backend waits forever for a result whose workers are all gone (a lost task is
    only rescheduled when some worker remains): after ``grace`` seconds without any worker the
    watchdog cancels the sweep's tasks, which ends the wait with an error that we handle like a
    dead loky worker.
    """

    def __init__(self, scheduler: str | None, workers: int, grace: float):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise UserError("--backend dask needs dask.distributed: pip install 'initbench[dask]'") from None
        self.grace = grace
        self.cluster = None
        # distributed logs every connection at INFO; a sweep's output is its progress bar.
        for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core",
                     "distributed.worker", "distributed.http.proxy"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            if scheduler:
                self.client = Client(scheduler, timeout=10, set_as_default=False)
            else:
                self.cluster = LocalCluster(n_workers=max(workers, 1), threads_per_worker=1, processes=True,
                                            dashboard_address=":0", silence_logs=logging.ERROR)
                self.client = Client(self.cluster, set_as_default=False)
        except OSError as err:
            raise UserError(f"--scheduler {scheduler}: cannot connect ({err})") from None
        self.lost = threading.Event()

    def workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1)["workers"])

    @contextlib.contextmanager
    def watchdog(self) -> Iterator[None]:
        stop = threading.Event()

        def watch() -> None:
            since = None
            while not stop.wait(0.5):
                try:
                    alive = self.workers()
                except Exception:  # noqa: BLE001 - an unreachable scheduler counts as no workers
                    alive = 0
                since = None if alive else (since or time.monotonic())
                if since is not None and time.monotonic() - since > self.grace:
                    self.lost.set()
                    from distributed import Future

                    self.client.cancel([Future(key, self.client) for key in list(self.client.futures)],
                                       force=True)
                    return

        thread = threading.Thread(target=watch, name="initbench-dask-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def run_alone(self, job: Job, cfg: MetricsConfig, device: str, cause: str) -> list[JobResult]:
        """One job as its own dask task; a worker it kills, or no worker at all, is its failure."""
        if self.lost.is_set():
            return [record.failed(job, f"no dask worker left to retry it (after: {cause})",
                                  environment(device))]
        with self.watchdog():
            future = self.client.submit(run_bundle, (job,), cfg, device, 0, pure=False, retries=0)
            try:
                return _checked(future.result())
            except Exception as err:  # noqa: BLE001 - KilledWorker, CancelledError: the job's failure
                why = "no dask worker left" if self.lost.is_set() else f"{type(err).__name__}: {err}"
                return [record.failed(job, f"{why} while training this job alone (after: {cause})",
                                      environment(device))]

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def execute(bundles: list[Bundle], cfg: MetricsConfig, *, workers: int, backend: str = "loky",
            scheduler: str | None = None, stop: threading.Event | None = None) -> Iterator[JobResult]:
    """Run bundles and yield each job's result as its bundle finishes.

    A worker that dies takes its bundle with it: the bundles that may have been running are
    retried one job at a time, each alone in a fresh worker, so that the job that kills its
    worker is identified and recorded as ``failed`` with the cause; the rest of the sweep goes
    on in a new pool.

    Args:
        bundles: from :func:`plan`.
        cfg: metric thresholds.
        workers: worker processes; 0 runs every bundle in this process (no pool). With dask,
            the size of a local cluster (an existing cluster uses all its workers).
        backend: a joblib backend name (see :data:`BACKENDS`).
        scheduler: a dask scheduler address; without one, dask starts a local cluster.
        stop: once set (the sweep got SIGTERM), no further bundle is started; the bundles already
            handed to workers run on, their results are yielded, and the generator ends. Closing
            the generator early abandons them instead: joblib kills the loky workers, and a local
            dask cluster is shut down.
    """
    stopping = stop.is_set if stop is not None else lambda: False
    if stopping():
        return  # before any worker or cluster is started
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose from {list(BACKENDS)}")
    # Split the cores between workers so that their matmul threads don't oversubscribe (idle
    # OpenMP threads spin, so two busy pools on one core slow each other down many times over).
    # This process's thread count (the cores, or OMP_NUM_THREADS) caps the total. Dask workers keep
    # their own settings.
    cores = min(os.cpu_count() or 1, _thread_cap())
    on_cpu = bool(bundles) and bundles[0].device == "cpu"
    threads = max(1, cores // max(workers, 1)) if on_cpu and backend != "dask" else 0
    if workers == 0 and backend != "dask":
        log.info("dispatch: %d bundles in-process, %d threads", len(bundles), threads)
        previous = torch.get_num_threads()
        try:
            for b in bundles:
                if stopping():
                    return
                yield from _checked(run_bundle(b.jobs, cfg, b.device, threads))
        finally:
            torch.set_num_threads(previous)
        return
    dask = _Dask(scheduler, workers, DASK_GRACE_S) if backend == "dask" and bundles else None
    try:
        n = dask.workers() if dask else workers
        log.info("dispatch: %d bundles, %d workers (%s), %d threads each", len(bundles), n, backend, threads)
        todo = list(bundles)
        while todo:
            try:
                yield from _pool(todo, cfg, n, backend, threads, dask, stopping)
                return
            except WorkerCrash as crash:
                if stopping():  # e.g. SIGTERM sent to the whole process group: its jobs rerun on resume
                    return
                log.warning("%s; retrying %d bundles one job at a time", crash.cause, len(crash.suspects))
                for b in crash.suspects:
                    for job in b.jobs:
                        if stopping():
                            return
                        if dask:
                            yield from dask.run_alone(job, cfg, b.device, crash.cause)
                        else:
                            yield from _isolated(job, cfg, b.device, threads, crash.cause)
                todo = crash.untouched
                if dask and dask.lost.is_set():  # nothing left to run on: record, don't wait
                    lost = [j for b in todo for j in b.jobs]
                    env = environment(todo[0].device) if todo else {}
                    yield from (record.failed(j, "no dask worker left to run it", env) for j in lost)
                    todo = []
    finally:
        if dask:
            try:
                dask.close()
            except BaseException:
                # The sweep's grace period may run out (one exception, raised once) just as the
                # cluster closes: close it again, so that no worker process outlives the sweep.
                dask.close()
                raise


def _pool(bundles: list[Bundle], cfg: MetricsConfig, workers: int, backend: str, threads: int,
          dask: _Dask | None, stopping: Callable[[], bool]) -> Iterator[JobResult]:
    """One joblib Parallel over bundles; a dead worker becomes :class:`WorkerCrash`."""
    pre_dispatch = 2 * max(workers, 1)
    finished: set[int] = set()
    config = (parallel_config(backend="dask", client=dask.client, wait_for_workers_timeout=dask.grace)
              if dask else contextlib.nullcontext())
    with config, (dask.watchdog() if dask else contextlib.nullcontext()):
        parallel = Parallel(n_jobs=-1 if dask else workers, backend=None if dask else backend,
                            return_as="generator_unordered", pre_dispatch=pre_dispatch)
        outputs = parallel(_tasks(bundles, cfg, threads, stopping))
        try:
            for index, results in outputs:
                finished.add(index)
                yield from _checked(results)
        except (BrokenProcessPool, *_dask_errors()) as err:
            # Bundles go out in order and at most pre_dispatch ahead of those finished: any later
            # bundle never reached a worker and is innocent.
            horizon = len(finished) + pre_dispatch
            left = [i for i in range(len(bundles)) if i not in finished]
            cause = "every dask worker was lost" if dask and dask.lost.is_set() else _crash_cause(err)
            raise WorkerCrash(cause, [bundles[i] for i in left if i < horizon],
                              [bundles[i] for i in left if i >= horizon]) from None
        finally:
            # Closed early (Ctrl-C, SIGTERM's grace ran out, the store cannot be written): joblib
            # kills the workers and warns that their tasks were cancelled, which is the point.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"\d+ tasks (have been|which were)")
                outputs.close()


def _dask_errors() -> tuple[type[BaseException], ...]:
    """What a lost or cancelled dask task raises (empty when dask is not installed)."""
    import asyncio
    import concurrent.futures

    errors: list[type[BaseException]] = [concurrent.futures.CancelledError, asyncio.CancelledError]
    try:
        from distributed.scheduler import KilledWorker

        errors.append(KilledWorker)
    except ImportError:
        pass
    return tuple(errors)


def _tasks(bundles: list[Bundle], cfg: MetricsConfig, threads: int, stopping: Callable[[], bool]) -> Iterator:
    # joblib pulls from this as workers free up (from its callback thread): once the sweep is
    # stopping, it gets nothing more, and Parallel ends when the bundles already out are done.
    for i, b in enumerate(bundles):
        if stopping():
            return
        yield delayed(_tagged)(i, b, cfg, threads, tuple(sys.path))


def _tagged(index: int, bundle: Bundle, cfg: MetricsConfig, threads: int,
            path: tuple[str, ...]) -> tuple[int, list[JobResult]]:
    _leave_sigterm_to_the_sweep()
    _adopt_path(path)
    return index, run_bundle(bundle.jobs, cfg, bundle.device, threads)


def _alone(job: Job, cfg: MetricsConfig, device: str, threads: int, path: tuple[str, ...]) -> list[JobResult]:
    _leave_sigterm_to_the_sweep()
    _adopt_path(path)
    return run_bundle((job,), cfg, device, threads)


def _adopt_path(path: tuple[str, ...]) -> None:
    """Put the sweep's import path entries that this worker lacks in front of its own.

    loky reuses its worker processes between sweeps of one Python process, and a worker's
    sys.path is the parent's at the worker's start: a user factory or task on a path added since
    (a notebook's ``sys.path.insert``) would not import in a reused worker.
    """
    sys.path[:0] = [p for p in path if p not in sys.path]


def _leave_sigterm_to_the_sweep() -> None:
    """In a loky worker: ignore SIGTERM while the sweep that started this process is alive.

    A scheduler (SLURM) may signal every process of a job, workers included. The sweep decides:
    it lets the bundles in flight finish within its grace period, and then kills the workers
    itself (joblib's abort, SIGKILL). A worker whose sweep is gone exits on SIGTERM as usual.
    Does nothing in a thread (the threading backend, dask workers), where signals are not ours.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    sweep = os.getppid()

    def on_sigterm(signum: int, frame: object) -> None:
        if os.getppid() != sweep:
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def _isolated(job: Job, cfg: MetricsConfig, device: str, threads: int, cause: str) -> list[JobResult]:
    """Run one job alone in a fresh single worker process; its death is its failure."""
    executor = get_reusable_executor(max_workers=1)
    try:
        return _checked(executor.submit(_alone, job, cfg, device, threads, tuple(sys.path)).result())
    except BrokenProcessPool as err:
        return [record.failed(job, f"{_crash_cause(err)} while training this job alone "
                              f"(retried after its bundle's worker died: {cause})",
                              environment(device))]


def _thread_cap() -> int:
    # torch's thread count in the parent: the cores, or OMP_NUM_THREADS, or what a caller (a test
    # running alongside others) chose. Never raise it: spinning threads on a busy core cost more
    # than they add.
    return max(1, torch.get_num_threads())


def _checked(results: object) -> list[JobResult]:
    if not isinstance(results, list) or not all(isinstance(r, JobResult) for r in results):
        raise TypeError(f"a worker returned {type(results).__name__}, expected a list of JobResult")
    return results
