"""Training a bundle: K models of one shape as stacked parameters, one code path for every K.

Each job's model is first built and initialized as a plain ``nn.Sequential``
(:func:`build_model`), exactly as a classic training loop would; its
parameters are then stacked into ``(K, in, out)`` tensors and trained with
batched matmuls. Losses are summed over jobs, so job k's gradient is exactly
d loss_k / d params_k: jobs never influence each other, and a job's numbers do
not depend on which bundle it ran in (tests/test_engine.py checks this against
``torch.optim`` on the plain model).

Probes run at step 0, every ``log_every`` steps and after the last update
(step ``steps``): per layer, statistics of weights, biases, their gradients and
update sizes, and of the activations on the step's training batch.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.job import Job
from bench.schema import KINDS, STATS
from bench.train import activations, models, tasks
from bench.train.bundle import (
    BundleOutput,
    TraceRow,
    build_model,
    logged_steps,
    loss_per_job,
    mark_divergence,
    mlp_rows,
)
from bench.train.optim import FlatOptimizer
from bench.train.probes import catalog, probe


def train(jobs: list[Job], *, divergence_ratio: float = 10.0, device: str = "cpu",
          probes: bool = True, keep_params: bool = False) -> BundleOutput:
    """Train a bundle of jobs that share a shape (see ``Job.shape_key``) as one stacked model.

    Args:
        jobs: one or more jobs with the same shape key; init, learning rate, optimizer
            hyperparameters and seed may differ.
        divergence_ratio: a job whose minibatch loss is non-finite or exceeds this times
            its step-0 loss is diverged: it stops training; the others go on.
        device: a torch device string.
        probes: record per-layer statistics and gradient norms (False only to measure their
            cost; the validation loss is recorded either way).
        keep_params: return each job's final parameters (for tests).
    """
    ref = jobs[0]
    assert all(j.shape_key() == ref.shape_key() for j in jobs), "a bundle's jobs must share a shape"
    K, steps, L = len(jobs), ref.steps, ref.log_every
    dev = torch.device(device)
    data = [tasks.load(j.task, j.task_params, j.seed) for j in jobs]
    classes = data[0].classes
    built = [build_model(j, d) for j, d in zip(jobs, data)]
    # Job k's parameters, in nn.Sequential's order (W1, b1, W2, ...), are row k of one flat
    # buffer; the layers' stacked tensors are leaf views into it, so autograd sees (K, in, out)
    # weights and (K, out) biases while the optimizer updates the whole buffer at once. Weights
    # are stored transposed (x @ W, not x @ W^T): the gradient bmm then comes out in the
    # weight's own layout, and autograd does not copy it into that layout every step.
    def stored(p: torch.Tensor) -> torch.Tensor:
        return p.detach().t() if p.dim() == 2 else p.detach()

    flat = torch.stack([torch.cat([stored(p).flatten() for p in m.parameters()]) for m in built]).to(dev)
    params, offsets, at = [], [], 0
    for p in built[0].parameters():
        params.append(flat[:, at:at + p.numel()].view(K, *stored(p).shape).requires_grad_())
        offsets.append((at, at + p.numel()))
        at += p.numel()
    W, B = params[0::2], params[1::2]
    opt = FlatOptimizer(jobs, flat)
    act = activations.get(ref.activation)
    act_fn, act_inplace = act.fn, act.inplace or act.fn  # in place when a step records no preactivations

    x_train = torch.stack([mlp_rows(d.x_train) for d in data]).to(dev)
    y_train = torch.stack([d.y_train for d in data]).to(dev)
    x_val = torch.stack([mlp_rows(d.x_val) for d in data]).to(dev)
    y_val = torch.stack([d.y_val for d in data]).to(dev)
    n, d_in, d_out = x_train.shape[1], x_train.shape[2], y_train.shape[2:]
    # Every step's batch as row numbers into the (K * n, ...) data: one index_select per step
    # copies whole rows, about 5x faster than advanced indexing with (K, 1) x (K, batch) indices.
    schedule = torch.stack([tasks.batch_schedule(j.seed, n, j.batch_size, steps) for j in jobs], 1).to(dev)
    schedule += n * torch.arange(K, device=dev)[:, None]
    x_rows, y_rows = x_train.view(K * n, d_in), y_train.view(K * n, *d_out)

    def forward(x: torch.Tensor, record: list | None) -> torch.Tensor:
        h = x
        for i in range(ref.depth):
            z = torch.baddbmm(B[i].unsqueeze(1), h, W[i])
            h = (act_fn if record is not None else act_inplace)(z) if i < ref.depth - 1 else z
            if record is not None:
                record.append((z, h if i < ref.depth - 1 else None))
        return h

    log_steps = logged_steps(steps, L)
    n_log = len(log_steps)
    losses = torch.full((steps + 1, K), float("nan"), device=dev)
    val_loss = torch.full((n_log, K), float("nan"), device=dev)
    val_acc = torch.full((n_log, K), float("nan"), device=dev)
    grad_norm = torch.full((n_log, K), float("nan"), device=dev)
    layer_stats = torch.full((n_log, K, ref.depth, len(KINDS), len(STATS)), float("nan"), device=dev)
    active = torch.ones(K, dtype=torch.bool, device=dev)
    diverged_at = np.full(K, -1)
    init_loss = torch.zeros(K, device=dev)
    li = 0

    for t in range(steps + 1):
        logged = li < n_log and log_steps[li] == t  # validation loss, and the probes if on
        probing = probes and logged
        idx = schedule[t].flatten()
        x = x_rows.index_select(0, idx).view(K, -1, d_in)
        record: list | None = [] if probing else None
        out = forward(x, record)
        loss = loss_per_job(out, y_rows.index_select(0, idx).view(K, -1, *d_out), classes)
        if t == 0:
            init_loss = loss.detach().clone()
            input_q = x.pow(2).mean(dim=(1, 2))
        bad = mark_divergence(loss, init_loss, active, diverged_at, t, divergence_ratio)
        losses[t] = torch.where(active | bad, loss.detach(), torch.full_like(loss, float("nan")))
        for p in params:
            p.grad = None
        # A job diverging now still gets this step's gradient, probes and validation pass: its record
        # describes the state it diverged from (at step 0, its initialization). Only then is it retired.
        torch.where(active | bad, loss, torch.zeros_like(loss)).sum().backward()
        if probing:  # the state this step starts from: parameters, their gradients, activations
            with torch.no_grad():
                probe(layer_stats[li], grad_norm[li], W, B, record, units=li in (0, n_log - 1))
        if logged:
            with torch.no_grad():
                vout = forward(x_val, None)
                val_loss[li] = loss_per_job(vout, y_val, classes)
                if classes is not None:
                    val_acc[li] = (vout.argmax(-1) == y_val).float().mean(1)
        for k in np.flatnonzero(diverged_at == t):
            opt.retire(int(k))
            for p in params:
                p.grad[k] = 0
        before = flat.clone() if probing and t < steps else None
        if t < steps:
            opt.step(torch.cat([p.grad.flatten(1) for p in params], dim=1))
        if before is not None:
            with torch.no_grad():
                delta = flat - before
                for j, (a, b) in enumerate(offsets):
                    layer_stats[li, :, j // 2, j % 2, STATS.index("update_ratio")] = \
                        delta[:, a:b].norm(dim=1) / before[:, a:b].norm(dim=1)
        li += int(logged)
        if not bool(active.any()):
            break

    final = ([[stored(p[k]).cpu().clone() for p in params] for k in range(K)]  # back to (out, in)
             if keep_params else [])
    rows, picks = trace_rows(ref.depth)
    stats = layer_stats.cpu().numpy()  # float32, as the metrics have always read it
    return BundleOutput(log_steps=log_steps, losses=losses.cpu().numpy(), val_loss=val_loss.cpu().numpy(),
                        val_acc=val_acc.cpu().numpy(), grad_norm=grad_norm.cpu().numpy(), rows=rows,
                        row_stats=stats.reshape(n_log, K, -1, len(STATS))[:, :, picks],
                        modules=catalog(built[0]), diverged_at=diverged_at,
                        init_loss=init_loss.cpu().numpy(), input_q=input_q.cpu().numpy(),
                        null_loss=np.array([d.null_loss for d in data]),
                        dims=models.layer_dims(data[0].d_in, data[0].d_out, ref.depth, ref.width),
                        final_params=final)


def trace_rows(depth: int) -> tuple[list[TraceRow], np.ndarray]:
    """The MLP's trace rows, and where each sits in the engine's (depth x KINDS) probe array.

    The model is an ``nn.Sequential`` of Linear, activation, ..., Linear: linear layer i is module
    ``2i`` (its weight, bias and output, the preactivation) and its activation module ``2i + 1``
    (the post-activation, absent after the output layer).
    """
    rows, picks = [], []
    for i in range(depth):
        for k, kind in enumerate(KINDS):
            if kind == "act" and i == depth - 1:
                continue
            module = 2 * i + 1 if kind == "act" else 2 * i
            rows.append(TraceRow(str(module), module, kind))
            picks.append(i * len(KINDS) + k)
    return rows, np.array(picks)


def layer_array(out: BundleOutput) -> np.ndarray:
    """An MLP bundle's trace as the engine's probe array: (n_log, K, depth, len(KINDS), len(STATS)).

    The inverse of :func:`trace_rows`' picking; the output layer's ``act`` entries are NaN.
    """
    n_log, k = out.row_stats.shape[:2]
    depth = sum(r.param == "weight" for r in out.rows)
    flat = np.full((n_log, k, depth * len(KINDS), len(STATS)), np.nan)
    flat[:, :, trace_rows(depth)[1]] = out.row_stats
    return flat.reshape(n_log, k, depth, len(KINDS), len(STATS))


def param_count(job: Job, d_in: int, d_out: int) -> int:
    """Number of parameters of one job's model (for cost estimates)."""
    dims = models.layer_dims(d_in, d_out, job.depth, job.width)
    return sum(a * b + b for a, b in zip(dims, dims[1:]))

