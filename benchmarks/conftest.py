"""What every benchmark shares: the thread count, the device, the specs, and how figures are stored.

Only ratios measured in one run mean much on a shared machine, so benchmarks that
compare two things interleave them round by round (pytest-benchmark's ``setup`` hook
times the other side between the timed rounds) and store both medians and their ratio
in ``benchmark.extra_info``, where ``--benchmark-compare`` finds them on later commits.

Options:
    --bench-device cpu|cuda    where the engine trains (default cpu)
    --bench-full               train the specs' full step counts instead of the short ones
Environment:
    INITBENCH_BENCH_THREADS    torch threads on both sides of every comparison (default 2)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# isort: off
import bench  # noqa: F401 - before torch: it sets the OpenMP spin policy torch reads on import, as a sweep does
import torch
# isort: on

from bench import dispatch, spec
from bench.spec import Job

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPECS = HERE / "specs"
THREADS = int(os.environ.get("INITBENCH_BENCH_THREADS", "2"))

# One thread count for the whole session, set before anything runs: both sides of a
# comparison must get the same cores, and changing it mid-run restarts the OpenMP pool.
torch.set_num_threads(THREADS)
# Freed memory is reused, as in every process that trains a sweep's bundles (both sides benefit).
dispatch.keep_freed_memory()


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Run the benchmarks in one process, whatever the root ``addopts`` say (``-n auto``).

    Timings from parallel xdist workers would measure each other, and pytest-benchmark
    disables itself under xdist. Runs before xdist's own hook, which then sets ``dist = no``.
    """
    if getattr(config.option, "numprocesses", None):
        config.option.numprocesses = 0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("initbench benchmarks")
    group.addoption("--bench-device", default="cpu", help="torch device the engine trains on (cpu, cuda)")
    group.addoption("--bench-full", action="store_true",
                    help="train the specs' full step counts (300) instead of the shortened ones")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    name = request.config.getoption("--bench-device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"--bench-device {name}: no CUDA device visible")
    return name


@pytest.fixture(scope="session")
def full(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--bench-full"))


def spec_jobs(name: str, **overrides) -> list[Job]:
    """The jobs of ``benchmarks/specs/<name>.toml``, with settings replaced (e.g. ``steps=50``)."""
    jobs = spec.load(SPECS / f"{name}.toml").jobs()
    return [dataclasses.replace(j, **overrides) for j in jobs] if overrides else jobs


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer around it measures the work, not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: str = "cpu") -> float:
    """Wall time of one call of ``fn`` (synchronized on a GPU)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed_rounds(benchmark) -> list[float]:
    """Every round time pytest-benchmark measured for this test (warm-up rounds excluded).

    With ``--benchmark-disable`` the benchmark ran once as a smoke test and measured nothing:
    the test is skipped rather than recording figures it does not have.
    """
    if benchmark.disabled or not benchmark.stats:
        pytest.skip("benchmarking is disabled (--benchmark-disable): ran once, no figures")
    return list(benchmark.stats.stats.data)


def record(benchmark, **figures: object) -> None:
    """Store figures with the benchmark's JSON (``--benchmark-autosave``), plus how they were made."""
    benchmark.extra_info.update({"threads": THREADS, "torch": torch.__version__, **figures})


def warm_torch_optim() -> None:
    """Take one torch.optim step, once: the first one imports torch._dynamo (about 1.5 s here),
    a one-off cost that would otherwise land in the classic loop's first timed round."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    p.sum().backward()
    opt.step()


def interleaved(benchmark, target: Callable[[], object], other: Callable[[], object], *, rounds: int,
                warmup_rounds: int = 1, device: str = "cpu") -> tuple[list[float], list[float]]:
    """Benchmark ``target`` and time ``other`` right before each of its rounds.

    pytest-benchmark calls ``setup`` before every round, untimed; timing ``other`` there
    interleaves the two, so a burst of load from another process hits both sides alike.

    Returns:
        (target's round times, other's round times), warm-up rounds dropped; other[i]
        ran just before target[i].
    """
    others: list[float] = []

    def setup() -> None:
        others.append(seconds(other, device))

    def run() -> None:
        target()
        sync(device)

    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
    return timed_rounds(benchmark), others[warmup_rounds:]


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of numerator / denominator (each pair measured back to back)."""
    return median([a / b for a, b in zip(numerators, denominators)])
