"""Planning bundles, placing them on devices, and running them through joblib.

This is the one place where work is dispatched: one ``Parallel(...)`` call,
its configuration logged once, every returned value type-checked. Workers
return :class:`~bench.record.JobResult` lists; the caller (the parent) stores
them as they arrive, so a killed sweep loses only the bundles in flight.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from joblib import Parallel, delayed

from bench import record
from bench.engine import flops_per_step, train
from bench.errors import UserError
from bench.record import JobResult
from bench.spec import Job, MetricsConfig

log = logging.getLogger(__name__)
BACKENDS = ("loky", "dask", "threading")
# Below this many estimated training FLOPs a sweep runs in this process: starting a pool
# of workers (each importing torch) costs seconds, more than such a sweep takes.
IN_PROCESS_FLOPS = 2e11


@dataclass(frozen=True)
class Bundle:
    """Jobs trained together as one stacked model on one device."""

    jobs: tuple[Job, ...]
    device: str = "cpu"

    @property
    def cost(self) -> float:
        """Estimated training FLOPs (input and output widths approximated by the hidden width)."""
        job = self.jobs[0]
        return len(self.jobs) * job.steps * flops_per_step(job, job.width, job.width)


def parse_devices(text: str, cuda_count: int | None = None) -> list[str]:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:0,cuda:1`` -> device strings.

    Args:
        text: the ``--devices`` value.
        cuda_count: visible CUDA devices (injectable for tests; default: torch's count).
    """
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    text = text.strip()
    if text == "auto":
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    if text == "cpu":
        return ["cpu"]
    if text == "cuda":
        if not count:
            raise UserError("--devices cuda: no CUDA device is visible; choose from ['auto', 'cpu']")
        return [f"cuda:{i}" for i in range(count)]
    devices = []
    for part in text.split(","):
        part = part.strip()
        prefix, _, index = part.partition(":")
        if prefix != "cuda" or not index.isdigit():
            raise UserError(f"--devices {text!r}: {part!r} is not a device; choose from "
                            "'auto', 'cpu', 'cuda' or a list like 'cuda:0,cuda:1'")
        if int(index) >= count:
            raise UserError(f"--devices {text!r}: {part} does not exist ({count} CUDA devices visible)")
        devices.append(f"cuda:{int(index)}")
    return devices


def plan(jobs: list[Job], devices: list[str], *, max_bundle: int = 64, workers: int = 1) -> list[Bundle]:
    """Group jobs that share a shape into bundles of at most ``max_bundle``, placed round-robin.

    Groups are split evenly (not greedily) so bundles of one shape have equal sizes; when there
    are fewer bundles than workers, the largest are halved so that every worker has work.
    """
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.shape_key(), []).append(job)
    chunks: list[list[Job]] = []
    for group in groups.values():
        parts = math.ceil(len(group) / max_bundle)
        size = math.ceil(len(group) / parts)
        chunks.extend(group[i: i + size] for i in range(0, len(group), size))
    while chunks and len(chunks) < workers and max(len(c) for c in chunks) > 1:
        chunks.sort(key=len)
        big = chunks.pop()
        chunks.extend([big[: len(big) // 2], big[len(big) // 2:]])
    # Most expensive first, so the last bundles to finish are short ones.
    bundles = sorted((Bundle(tuple(c)) for c in chunks), key=lambda b: -b.cost)
    return [Bundle(b.jobs, devices[i % len(devices)]) for i, b in enumerate(bundles)]


def run_bundle(jobs: tuple[Job, ...], cfg: MetricsConfig, device: str, threads: int) -> list[JobResult]:
    """Train one bundle in this process and return its results; never raises for a job's error.

    A bundle that raises is retried one job at a time, so one bad job cannot take its
    bundle-mates down; a job that still raises becomes a ``failed`` row with its error.
    """
    if threads:
        torch.set_num_threads(threads)
    env = record.environment(device)
    start = time.perf_counter()
    try:
        out = train(list(jobs), divergence_ratio=cfg.divergence_ratio, device=device)
        return record.from_bundle(list(jobs), out, cfg, time.perf_counter() - start, env)
    except Exception as err:  # noqa: BLE001 - any error in user data or training is the job's result
        if len(jobs) > 1:
            return [r for job in jobs for r in run_bundle((job,), cfg, device, threads)]
        message = f"{type(err).__name__}: {err}"
        log.debug("job %s failed:\n%s", jobs[0].job_id, traceback.format_exc())
        return [record.failed(jobs[0], message, env, time.perf_counter() - start)]


def choose_workers(bundles: list[Bundle], devices: list[str], jobs: int = 0) -> int:
    """Worker processes: ``jobs`` if given, else one per device for CUDA, else per core (or 0: in-process)."""
    if jobs:
        return min(jobs, max(len(bundles), 1))
    if devices[0].startswith("cuda"):
        return min(len(devices), len(bundles))
    if sum(b.cost for b in bundles) < IN_PROCESS_FLOPS:
        return 0
    return min(os.cpu_count() or 1, len(bundles))


def execute(bundles: list[Bundle], cfg: MetricsConfig, *, workers: int,
            backend: str = "loky") -> Iterator[JobResult]:
    """Run bundles and yield each job's result as its bundle finishes.

    Args:
        bundles: from :func:`plan`.
        cfg: metric thresholds.
        workers: worker processes; 0 runs every bundle in this process (no pool).
        backend: a joblib backend name (see :data:`BACKENDS`).
    """
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose from {list(BACKENDS)}")
    # Split the cores between workers so that their matmul threads don't oversubscribe (idle
    # OpenMP threads spin, so two busy pools on one core slow each other down many times over).
    # A user's OMP_NUM_THREADS caps the total.
    cores = min(os.cpu_count() or 1, _thread_cap())
    threads = max(1, cores // max(workers, 1)) if bundles and bundles[0].device == "cpu" else 0
    log.info("dispatch: %d bundles, %d workers (%s), %d threads each", len(bundles), workers,
             backend if workers else "in-process", threads)
    if workers == 0:
        previous = torch.get_num_threads()
        try:
            for b in bundles:
                yield from _checked(run_bundle(b.jobs, cfg, b.device, threads))
        finally:
            torch.set_num_threads(previous)
        return
    parallel = Parallel(n_jobs=workers, backend=backend, return_as="generator_unordered")
    for results in parallel(delayed(run_bundle)(b.jobs, cfg, b.device, threads) for b in bundles):
        yield from _checked(results)


def _thread_cap() -> int:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else os.cpu_count() or 1


def _checked(results: object) -> list[JobResult]:
    if not isinstance(results, list) or not all(isinstance(r, JobResult) for r in results):
        raise TypeError(f"a worker returned {type(results).__name__}, expected a list of JobResult")
    return results
