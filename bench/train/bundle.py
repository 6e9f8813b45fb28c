"""What every engine shares: a job's model as PyTorch builds it, the loss, and the output arrays.

Each job's model is built and initialized as a plain ``nn.Module`` (:func:`build_model`),
exactly as a classic training loop would; engines then train many of them at once, and
return a :class:`BundleOutput` that :mod:`bench.record` turns into tables.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench import theory
from bench.job import Job
from bench.train import inits, models, names, tasks

_BUILDING = threading.Lock()


@dataclass(frozen=True)
class TraceRow:
    """What one row of a job's layer trace describes (``bench.load(DIR).layers``)."""

    module: str  # the module's dotted name, as in named_modules() and the catalog
    index: int  # the module's position in the forward pass (the catalog's index)
    param: str  # a parameter's own name (weight, bias, in_proj_weight, ...) or an output kind (act, preact)


@dataclass
class BundleOutput:
    """Raw per-job arrays from one bundle; :mod:`bench.record` turns them into tables."""

    log_steps: np.ndarray  # (n_log,) steps at which probes ran
    losses: np.ndarray  # (steps + 1, K) minibatch loss of every step; NaN after divergence
    val_loss: np.ndarray  # (n_log, K)
    val_acc: np.ndarray  # (n_log, K); NaN for regression
    grad_norm: np.ndarray  # (n_log, K) norm of the whole gradient
    rows: list[TraceRow]  # what each trace row describes (the same for every job of a bundle)
    row_stats: np.ndarray  # (n_log, K, len(rows), len(STATS)), float32 (stacked) or float64 (functional)
    diverged_at: np.ndarray  # (K,) step of divergence, -1 if never
    init_loss: np.ndarray  # (K,) loss at step 0 (the divergence reference)
    null_loss: np.ndarray  # (K,) training loss of the best input-independent predictor (TaskData.null_loss)
    input_q: np.ndarray  # (K,) mean squared input entry of the step-0 batch (for theory's q0)
    modules: list[dict]  # the catalog (schema.MODULE_COLUMNS), the same for every job of a bundle
    dims: list[int] | None  # MLP layer widths [d_in, hidden..., d_out] for theory's q_pred; None: no theory
    final_params: list[list[torch.Tensor]] = field(default_factory=list)  # per job [W1, b1, ...]
    # Per job, a residual MLP's second-moment maps for theory's q_pred on its stream; empty: no theory
    streams: list[theory.ResidualStream | None] = field(default_factory=list)


def build_model(job: Job, data: tasks.TaskData) -> nn.Module:
    """The job's model as a plain nn.Module, initialized by its scheme with the job's init seed.

    The MLP is an ``nn.Sequential`` built here; any other architecture comes from its factory
    (``models.build``: ``fn(in_shape, out_dim, **settings)``). The global RNG is forked, so
    building a model never disturbs the caller's random state, and the same job draws the same
    weights in any process, alone or bundled. One build at a time per process: bundles trained
    by concurrent threads share that global RNG.
    """
    if data.per_token and job.arch in models.ARCHS:  # the MLP predicts one output vector per sample
        raise tasks.TaskError(f"task {job.task!r} has per-token targets {tuple(data.y_train.shape[1:])}: "
                              f"arch {job.arch!r} predicts one output per sample, not one per token")
    with _BUILDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(tasks.derive_seed(job.seed, "init"))
        first = tasks.batch_schedule(job.seed, len(data.x_train), job.batch_size, 0)[0]
        if job.arch in models.ARCHS:
            model = models.ARCHS[job.arch](data.d_in, data.d_out, job.depth, job.width, job.activation)
            ctx = inits.InitContext(activation=job.activation, params=dict(job.init_params),
                                    data=mlp_rows(data.x_train[first]), forward=models.preactivations,
                                    width=job.width)
        else:
            settings = names.factory_settings(
                job.arch, {"depth": job.depth, "width": job.width, "activation": job.activation,
                           **dict(job.model_params)}, [k for k, _ in job.model_params])
            model = models.build(job.arch, data.in_shape, data.out_dim, settings)
            # A factory that takes no activation setting has no single known nonlinearity.
            rebuild = (lambda width, s=settings: models.build(job.arch, data.in_shape, data.out_dim,
                                                              {**s, "width": width})) \
                if "width" in settings else None
            ctx = inits.InitContext(activation=settings.get("activation"), params=dict(job.init_params),
                                    data=data.x_train[first], rebuild=rebuild,
                                    width=settings.get("width"))
        inits.apply(model, job.init, ctx, job.init_bias, job.init_rules, f"[init_rules.{job.rules}]")
    return model


def mlp_rows(x: torch.Tensor) -> torch.Tensor:
    """Samples as the MLP reads them: one float row each ((B, 1, 8, 8) images are (B, 64) rows).

    Integer inputs (token ids) become numbers; an MLP has no embedding to look them up in.
    """
    return x.flatten(1).float()


def logged_steps(steps: int, log_every: int) -> np.ndarray:
    """The steps at which an engine probes and validates: 0, every ``log_every``, and the last."""
    return np.array(sorted({*range(0, steps + 1, log_every), steps}))


def mark_divergence(loss: torch.Tensor, init_loss: torch.Tensor, active: torch.Tensor,
                    diverged_at: np.ndarray, t: int, ratio: float) -> torch.Tensor:
    """The jobs that diverge at step ``t`` (K,): non-finite loss, or above ``ratio`` x the step-0 loss.

    Updates ``active`` (they stop) and ``diverged_at`` (their step) in place. Checked every step:
    a CPU-GPU sync point, cheap next to a step.
    """
    bad = active & ~(torch.isfinite(loss) & (loss <= ratio * init_loss))
    if bool(bad.any()):
        for k in torch.nonzero(bad).flatten().tolist():
            diverged_at[k] = t
        active &= ~bad
    return bad


def loss_per_job(out: torch.Tensor, y: torch.Tensor, classes: int | None) -> torch.Tensor:
    """Mean loss of each job over its batch, shape (K,).

    Regression: MSE averaged over everything but the job axis (out and y (K, B, d), or any trailing
    dims). Classes: cross-entropy of out (K, B, C) against y (K, B), or per token, out (K, B, T, C)
    against y (K, B, T), averaged over the batch and its tokens.
    """
    if classes is None:
        return ((out - y) ** 2).mean(dim=tuple(range(1, out.dim())))
    k, c = out.shape[0], out.shape[-1]
    return F.cross_entropy(out.reshape(-1, c), y.reshape(-1), reduction="none").view(k, -1).mean(1)
