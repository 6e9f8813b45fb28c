"""The classic training loop, one model at a time: the yardstick for the stacked engine.

``nn.Sequential`` + ``torch.optim``, zero_grad / forward / loss / backward / step,
and each parameter's mean, std, norm and gradient norm recorded every
``log_every`` steps, as the tutorial in ``shared/seeds`` does by hand. The
tests compare the engine with it number for number; the benchmarks compare
their speed.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.job import Job
from bench.train import residual_inits, tasks
from bench.train.bundle import build_model, loss_per_job, mlp_rows


def make_optimizer(job: Job, params) -> torch.optim.Optimizer:
    """The torch.optim optimizer a job asks for, with its hyperparameters.

    ``params``: tensors, or torch.optim param groups (dicts) whose own lr / weight_decay win.
    """
    if job.optimizer == "sgd":
        return torch.optim.SGD(params, lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay)
    return torch.optim.Adam(params, lr=job.lr, betas=job.betas, weight_decay=job.weight_decay)


def param_groups(job: Job, model: nn.Module) -> list[dict] | list[nn.Parameter]:
    """What the optimizer trains: the model's parameters, or for a muP model one torch.optim param
    group per parameter with its muP lr and weight decay, as mup's MuSGD / MuAdam build them
    (``residual_inits.mup_lr_multipliers``, ``mup_wd_multipliers``)."""
    shapes = getattr(model, "mup_base_shapes", None)
    if shapes is None:
        return list(model.parameters())
    lr = residual_inits.mup_lr_multipliers(model, base_shapes=shapes, optimizer=job.optimizer)
    wd = residual_inits.mup_wd_multipliers(model, base_shapes=shapes, optimizer=job.optimizer)
    return [{"params": [p], "lr": job.lr * lr[n], "weight_decay": job.weight_decay * wd[n]}
            for n, p in model.named_parameters()]


def train_plain(job: Job, *, record: bool = True) -> tuple[list[float], nn.Module, list[dict]]:
    """Train one job the classic way; same model, init, batches and loss as the engine.

    Returns:
        (losses of steps 0..steps - 1, the trained model, per-parameter records at each
        logged step: {step, name, mean, std, norm, grad_norm}).
    """
    data = tasks.load(job.task, job.task_params, job.seed)
    model = build_model(job, data)
    opt = make_optimizer(job, param_groups(job, model))
    schedule = tasks.batch_schedule(job.seed, len(data.x_train), job.batch_size, job.steps)
    losses, records = [], []
    for t in range(job.steps):
        idx = schedule[t]
        opt.zero_grad()
        x = data.x_train[idx]
        out = model(mlp_rows(x) if job.arch == "mlp" else x)  # the MLP reads flat rows
        loss = loss_per_job(out.unsqueeze(0), data.y_train[idx].unsqueeze(0), data.classes)[0]
        loss.backward()
        losses.append(loss.item())
        if record and t % job.log_every == 0:
            for name, p in model.named_parameters():
                records.append({"step": t, "name": name, "mean": p.data.mean().item(),
                                "std": p.data.std().item(), "norm": p.data.norm().item(),
                                "grad_norm": p.grad.norm().item()})
        opt.step()
    return losses, model, records
