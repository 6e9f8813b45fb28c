"""``python benchmarks/classic_loop.py SPEC.toml``: the spec's jobs trained the classic way, one at a time.

The yardstick for the end-to-end benchmark: what a user without initbench would run
to get the same sweep. Each job is trained by ``bench.train.reference.train_plain`` (the
same model, init, batches and loss as the engine; ``nn.Sequential`` + ``torch.optim``;
every parameter's mean, std, norm and gradient norm recorded every ``log_every``
steps) and the records are written as one CSV. Timing this whole process against
``python -m bench.sweep SPEC --no-report`` compares interpreter start, imports and
output as well as training.

``--device cuda`` runs the same loop on a GPU (for ``gpu_check.sh``): ``train_plain``
has no device argument, so :func:`train_on` repeats its loop with tensors moved to
the device; on the CPU the reference itself runs.
"""

from __future__ import annotations

import csv
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from bench import cli, spec
from bench.spec import Job
from bench.train import reference, tasks
from bench.train.bundle import build_model, loss_per_job

# A one-unit output bias has no std (torch warns, and returns NaN as the engine records).
warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom")

FIELDS = ("job_id", "init", "lr", "seed", "depth", "width", "step", "train_loss", "name", "mean", "std",
          "norm", "grad_norm")


def train_on(job: Job, device: str) -> tuple[list[float], list[dict]]:
    """Train one job with the classic loop on ``device``; returns (losses, per-parameter records).

    On the CPU this is ``bench.train.reference.train_plain(job, record=True)``; elsewhere the same
    loop with the model and data moved to the device (each ``.item()`` is a GPU sync, as in
    any classic loop that logs).
    """
    if device == "cpu":
        losses, _, records = reference.train_plain(job, record=True)
        return losses, records
    data = tasks.load(job.task, job.task_params, job.seed)
    model = build_model(job, data).to(device)
    opt = reference.make_optimizer(job, model.parameters())
    x, y = data.x_train.to(device), data.y_train.to(device)
    schedule = tasks.batch_schedule(job.seed, len(data.x_train), job.batch_size, job.steps).to(device)
    losses, records = [], []
    for t in range(job.steps):
        idx = schedule[t]
        opt.zero_grad()
        out = model(x[idx])
        loss = loss_per_job(out.unsqueeze(0), y[idx].unsqueeze(0), data.classes)[0]
        loss.backward()
        losses.append(loss.item())
        if t % job.log_every == 0:
            for name, p in model.named_parameters():
                records.append({"step": t, "name": name, "mean": p.data.mean().item(),
                                "std": p.data.std().item(), "norm": p.data.norm().item(),
                                "grad_norm": p.grad.norm().item()})
        opt.step()
    return losses, records


def rows(job: Job, losses: list[float], records: list[dict]) -> list[dict]:
    """CSV rows of one job: its settings, the step's minibatch loss and each parameter's record."""
    head = {"job_id": job.job_id, "init": job.init, "lr": job.lr, "seed": job.seed, "depth": job.depth,
            "width": job.width}
    return [{**head, "train_loss": losses[r["step"]], **r} for r in records]


def _main(argv: list[str] | None) -> int:
    p = cli.Parser(prog="python benchmarks/classic_loop.py", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="the sweep spec (TOML)")
    p.add_argument("--out", default="classic.csv", help="CSV file to write (default: classic.csv)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = spec.load(args.spec).jobs()
    start = time.perf_counter()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for job in jobs:
            writer.writerows(rows(job, *train_on(job, args.device)))
    os.replace(tmp, out)  # a killed run leaves no half-written CSV behind
    print(f"{len(jobs)} jobs in {time.perf_counter() - start:.2f} s -> {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)  # a bad spec is one line on stderr and exit 2, as in bench.sweep


if __name__ == "__main__":
    sys.exit(main())
