"""Planning: which jobs train together (bundles), on which device, and how many worker processes.

Torch-free for the MLP, so ``--dry-run`` prints a plan without importing torch: the MLP's cost
is arithmetic, and the CUDA devices are counted by torch only where a GPU driver is present
(:func:`count_cuda`). Any other architecture is measured by building it (:func:`measured`):
that plan imports torch, because it needs the model.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
import sys
from dataclasses import dataclass

from bench.errors import UserError
from bench.job import Job
from bench.train.names import layer_dims

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
        if job.arch != "mlp":
            return len(self.jobs) * job.steps * measured(job)[0]
        return len(self.jobs) * job.steps * flops_per_step(job, job.width, job.width)


def _gpu_driver() -> bool:
    """Whether a GPU driver is present: CUDA's libcuda (never shipped inside a wheel) loads, or ROCm's
    /dev/kfd exists. Without either, torch sees no CUDA device, so nobody needs to import it to know."""
    if os.path.exists("/dev/kfd"):
        return True
    if sys.platform == "darwin":
        return False
    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    return True


def count_cuda() -> int:
    """The CUDA devices torch sees; 0 without importing torch where no GPU driver is present."""
    if not _gpu_driver():
        return 0
    import torch  # a driver is present: only torch knows which devices it can use

    return torch.cuda.device_count()


def parse_devices(text: str, cuda_count: int | None = None) -> list[str]:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:0,cuda:1`` -> device strings.

    Args:
        text: the ``--devices`` value.
        cuda_count: visible CUDA devices (injectable for tests; default: :func:`count_cuda`).
    """
    text = text.strip()
    if text == "cpu":
        return ["cpu"]
    count = count_cuda() if cuda_count is None else cuda_count
    if text == "auto":
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
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
            visible = ["auto", "cpu", *(f"cuda:{i}" for i in range(count))]
            raise UserError(f"--devices {text!r}: {part} does not exist ({count} CUDA devices visible); "
                            f"choose from {visible}")
        devices.append(f"cuda:{int(index)}")
    return devices


@functools.lru_cache(maxsize=256)
def _measure(job: Job) -> tuple[float, float]:
    # Function-local: measuring builds the model, so only a plan with a non-MLP arch imports torch.
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.train import tasks
    from bench.train.bundle import build_model

    data = tasks.load(job.task, job.task_params, job.seed)
    model = build_model(job, data)
    kept = [0]

    def count(module, args, out):
        if isinstance(out, torch.Tensor) and not list(module.children()):
            kept[0] += out.numel()

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with FlopCounterMode(display=False) as flops:
            model(data.x_train[:job.batch_size])
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    data_elems = sum(t.numel() for t in (data.x_train, data.y_train, data.x_val, data.y_val))
    # Training: the forward, and a backward of about twice its cost. Memory: parameters with their
    # gradient, optimizer state and probe copy, every leaf module's output and its gradient, the data.
    return 3.0 * flops.get_total_flops(), 4.0 * (6 * params + 2 * kept[0] + data_elems)


def measured(job: Job) -> tuple[float, float]:
    """(training FLOPs of one step, training bytes) of one job of a non-MLP architecture, measured.

    The model is built once per shape (cached) and run on one batch at plan time under
    ``torch.utils.flop_counter.FlopCounterMode``; a model that fails to build counts as free (its
    jobs then fail with their error when they run, one at a time).
    """
    shape = dataclasses.replace(job, seed=0, init="default", init_params=(), init_rules=(), rules="none",
                                lr=0.01)
    try:
        return _measure(shape)
    except Exception:  # noqa: BLE001 - the job reports its own error when it runs
        return 0.0, 0.0


def job_bytes(job: Job) -> float:
    """Estimated training memory of one job in a bundle (float32): parameters with their gradient,
    optimizer state and probe copy, the activations autograd keeps, and the job's data.

    Input and output widths are approximated by the hidden width; the estimate is for sizing
    bundles, not a promise. Other architectures are measured (:func:`measured`).
    """
    if job.arch != "mlp":
        return max(measured(job)[1], 1.0)
    params = job.depth * (job.width * job.width + job.width)
    activations = 4 * job.batch_size * job.width * job.depth  # z, h and their gradients
    data = 2 * 2048 * job.width  # a few thousand samples of train and val inputs
    return 4.0 * (6 * params + activations + data)


def plan(jobs: list[Job], devices: list[str], *, max_bundle: int = 64, memory_mb: float = 2048,
         workers: int = 1) -> list[Bundle]:
    """Group jobs that share a shape into bundles, balanced across devices by estimated cost.

    A bundle holds at most ``max_bundle`` jobs and at most ``memory_mb`` of estimated training
    memory (:func:`job_bytes`). Groups are split evenly (not greedily) so bundles of one shape
    have equal sizes; when there are fewer bundles than workers, the largest are halved so that
    every worker has work.
    """
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.shape_key(), []).append(job)
    chunks: list[list[Job]] = []
    for group in groups.values():
        fits = max(1, int(memory_mb * 2**20 // job_bytes(group[0])))
        parts = math.ceil(len(group) / min(max_bundle, fits))
        size = math.ceil(len(group) / parts)
        chunks.extend(group[i: i + size] for i in range(0, len(group), size))
    while chunks and len(chunks) < workers and max(len(c) for c in chunks) > 1:
        chunks.sort(key=len)
        big = chunks.pop()
        chunks.extend([big[: len(big) // 2], big[len(big) // 2:]])
    # Most expensive first, so the last bundles to finish are short ones; each goes to the device
    # with the least estimated work so far (greedy longest-processing-time balancing).
    bundles = sorted((Bundle(tuple(c)) for c in chunks), key=lambda b: -b.cost)
    load = dict.fromkeys(devices, 0.0)
    placed = []
    for b in bundles:
        device = min(devices, key=lambda d: load[d])
        load[device] += b.cost
        placed.append(Bundle(b.jobs, device))
    return placed


def flops_per_step(job: Job, d_in: int, d_out: int) -> float:
    """Approximate training FLOPs of one step of one MLP job: 6 x batch x weights (fwd + 2 bwd matmuls)."""
    dims = layer_dims(d_in, d_out, job.depth, job.width)
    return 6.0 * job.batch_size * sum(a * b for a, b in zip(dims, dims[1:]))


def choose_workers(bundles: list[Bundle], devices: list[str], jobs: int = 0) -> int:
    """Worker processes: ``jobs`` if given, else one per CUDA device, else one per core.

    0 means in-process (no pool): a small sweep of built-in tasks would spend longer starting
    workers than training, and a single worker would add start-up time and nothing else.
    Sweeps that call user code (a task factory) always get worker processes, so that a crash
    in that code is isolated and recorded instead of ending the sweep.
    ``--jobs 1`` also trains in-process (joblib runs n_jobs=1 sequentially).
    """
    if not bundles:
        return 0
    if jobs:
        return min(jobs, len(bundles)) if jobs > 1 else 0
    user_code = any(":" in j.task for b in bundles for j in b.jobs)
    if devices[0].startswith("cuda"):
        return min(len(devices), len(bundles))
    if user_code:
        return max(2, min(os.cpu_count() or 1, len(bundles)))
    cores = os.cpu_count() or 1
    workers = min(cores, len(bundles))
    # One worker would train the bundles in the same order as this process, with the same
    # threads, after seconds of start-up. On two cores, two one-thread workers train no faster
    # than this process with two threads (measured: the canonical sweep took 16.0 s with the
    # pool and 14.3 s in-process, docs/performance.md); more cores than a bundle's operators
    # use well is where a pool pays.
    small = sum(b.cost for b in bundles) < IN_PROCESS_FLOPS
    return 0 if workers == 1 or cores <= 2 or small else workers
