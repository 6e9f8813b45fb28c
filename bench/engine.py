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

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench import inits, models, tasks
from bench.schema import KINDS, STATS
from bench.spec import Job

ADAM_EPS = 1e-8  # torch.optim.Adam's default
_BUILDING = threading.Lock()


@dataclass
class BundleOutput:
    """Raw per-job arrays from one bundle; :mod:`bench.record` turns them into tables."""

    log_steps: np.ndarray  # (n_log,) steps at which probes ran
    losses: np.ndarray  # (steps + 1, K) minibatch loss of every step; NaN after divergence
    val_loss: np.ndarray  # (n_log, K)
    val_acc: np.ndarray  # (n_log, K); NaN for regression
    grad_norm: np.ndarray  # (n_log, K) norm of the whole gradient
    layer_stats: np.ndarray  # (n_log, K, depth, len(KINDS), len(STATS))
    diverged_at: np.ndarray  # (K,) step of divergence, -1 if never
    init_loss: np.ndarray  # (K,) loss at step 0 (the divergence reference)
    null_loss: np.ndarray  # (K,) training loss of the best input-independent predictor (TaskData.null_loss)
    input_q: np.ndarray  # (K,) mean squared input entry of the step-0 batch (for theory's q0)
    dims: list[int]  # layer widths [d_in, hidden..., d_out]
    final_params: list[list[torch.Tensor]] = field(default_factory=list)  # per job [W1, b1, ...]


def build_model(job: Job, data: tasks.TaskData) -> nn.Sequential:
    """The job's model as a plain nn.Sequential, initialized by its scheme with the job's init seed.

    The global RNG is forked, so building a model never disturbs the caller's random state,
    and the same job draws the same weights in any process, alone or bundled. One build at a
    time per process: bundles trained by concurrent threads share that global RNG.
    """
    with _BUILDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(tasks.derive_seed(job.seed, "init"))
        model = models.ARCHS[job.arch](data.d_in, data.d_out, job.depth, job.width, job.activation)
        first = tasks.batch_schedule(job.seed, len(data.x_train), job.batch_size, 0)[0]
        ctx = inits.InitContext(activation=job.activation, params=dict(job.init_params),
                                data=data.x_train[first], forward=models.preactivations)
        inits.apply(model, job.init, ctx, job.init_bias)
    return model


def loss_per_job(out: torch.Tensor, y: torch.Tensor, classes: int | None) -> torch.Tensor:
    """Mean loss of each job over its batch: MSE for regression, cross-entropy for classes. Shape (K,)."""
    if classes is None:
        return ((out - y) ** 2).mean(dim=(1, 2))
    k, b, c = out.shape
    return F.cross_entropy(out.reshape(k * b, c), y.reshape(k * b), reduction="none").view(k, b).mean(1)


def _stats(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mean, std, absmax, norm of each job's slice of ``t`` (K, ...) -> (K, 4), accumulated in ``dtype``.

    Four streaming reductions and no temporaries: torch.std on CPU is about 20x slower, and a
    two-pass std allocates a copy of every activation. The std comes from the norm and the mean;
    its cancellation error is ~1e-7 x (mean / std)^2 in float32, far below what the probes resolve.
    A float32 sum of squares overflows once entries pass ~1e17 (an exploding net at step 0);
    :func:`_probe` then redoes the step in float64 (10x slower, so only then).
    """
    flat = t.detach().flatten(1)
    n = flat.shape[1]
    mean = flat.mean(1, dtype=dtype)
    norm = torch.linalg.vector_norm(flat, dim=1, dtype=dtype)
    absmax = torch.maximum(flat.amax(1), -flat.amin(1)).to(dtype)
    if n > 1:
        std = ((norm * norm - n * mean * mean).clamp_min(0) / (n - 1)).sqrt()
    else:  # the std of a single value (a one-unit output bias) is undefined: NaN, as torch.std says
        std = torch.full_like(mean, float("nan"))
    return torch.stack([mean, std, absmax, norm], dim=1)


def _rms_norm(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """RMS over the batch of each sample's vector norm: (K, batch, width) -> (K,)."""
    return t.detach().to(dtype).pow(2).sum(-1).mean(-1).sqrt()


_PROJECTIONS: dict[tuple[int, str], torch.Tensor] = {}
DISTINCT_RTOL = 1e-5  # two units are copies when their projections agree to this x the layer's largest


def distinct_frac(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fraction of a layer's units that are not copies of another unit: (K, in, out), (K, out) -> (K,).

    Unit j is its incoming weights and bias, ``[w[:, :, j], b[:, j]]``. A unit is a copy when it agrees
    with an earlier unit of its layer to ``DISTINCT_RTOL`` relative to the layer's scale, compared
    through four fixed random projections (one matvec per layer, not a pairwise distance over all
    fan_in coordinates; two distinct random units agree on all four with probability ~1e-19). Units
    that start equal get equal gradients and stay copies (float rounding keeps them within the
    tolerance), so a width-n layer then computes what a narrower one would: 1/n for n clones.
    """
    units = torch.cat([w.detach().transpose(1, 2), b.detach().unsqueeze(-1)], dim=2)  # (K, out, in + 1)
    key = (units.shape[2], str(units.device))
    if key not in _PROJECTIONS:
        g = torch.Generator().manual_seed(0)
        _PROJECTIONS[key] = torch.randn(units.shape[2], 4, generator=g).to(units.device)
    proj = (units @ _PROJECTIONS[key].to(units.dtype)).double()  # (K, out, 4)
    n = proj.shape[1]
    tol = DISTINCT_RTOL * proj.abs().flatten(1).amax(1)
    close = torch.cdist(proj, proj, p=float("inf")) <= tol[:, None, None]
    earlier = torch.ones(n, n, dtype=torch.bool, device=proj.device).tril(-1)  # [j, i]: i < j
    copies = (close & earlier).any(dim=2).sum(1)
    return (n - copies).to(torch.float32) / n


class _Optimizer:
    """SGD (momentum, weight decay) and Adam on one flat (K, P) parameter buffer, per-job hyperparameters.

    Every job's parameters live side by side in ``flat`` (row k is job k's model), so a step is a
    handful of whole-buffer operations instead of a few per layer: on a CPU, each operator
    costs a wake-up of the thread pool, and per-layer updates made the optimizer as many
    operators as the rest of the step. The arithmetic follows torch.optim's single-tensor
    implementations step for step.
    """

    def __init__(self, jobs: list[Job], flat: torch.Tensor):
        dev = flat.device

        def column(values: list[float]) -> torch.Tensor:  # (K, 1): broadcasts over a job's row
            return torch.tensor(values, device=dev, dtype=flat.dtype).unsqueeze(1)

        self.kind = jobs[0].optimizer
        self.flat = flat
        self.lr = column([j.lr for j in jobs])
        self.wd = column([j.weight_decay for j in jobs])
        self.momentum = column([j.momentum for j in jobs])
        self.b1 = column([j.betas[0] for j in jobs])
        self.b2 = column([j.betas[1] for j in jobs])
        self.use_wd = any(j.weight_decay for j in jobs)
        self.state: list[torch.Tensor] = []
        self.t = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        """One update of every job from the flat gradient ``grad`` (K, P)."""
        self.t += 1
        p = self.flat
        g = grad + self.wd * p if self.use_wd else grad
        if self.kind == "sgd":
            if not self.state:
                self.state.append(g.clone())  # torch: the first momentum buffer is the gradient itself
            else:
                self.state[0].mul_(self.momentum).add_(g)
            p.addcmul_(self.state[0], -self.lr)
        else:
            if not self.state:
                self.state.extend([torch.zeros_like(p), torch.zeros_like(p)])
            m, v = self.state
            m.lerp_(g, 1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g * (1 - self.b2))
            bc1, bc2 = 1 - self.b1**self.t, 1 - self.b2**self.t
            denom = (v.sqrt() / bc2.sqrt()).add_(ADAM_EPS)
            p.sub_((self.lr / bc1) * m / denom)

    @torch.no_grad()
    def retire(self, k: int) -> None:
        """Stop job k for good (it diverged): zero its parameters and state, and its learning rate."""
        self.flat[k] = 0
        for s in self.state:
            s[k] = 0
        self.lr[k] = 0


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
    opt = _Optimizer(jobs, flat)
    _, act_fn = models.activation(ref.activation)
    act_inplace = models.INPLACE.get(ref.activation, act_fn)  # when a step records no preactivations

    x_train = torch.stack([d.x_train for d in data]).to(dev)
    y_train = torch.stack([d.y_train for d in data]).to(dev)
    x_val = torch.stack([d.x_val for d in data]).to(dev)
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

    log_steps = np.array(sorted({*range(0, steps + 1, L), steps}))
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
        probe = probes and logged
        idx = schedule[t].flatten()
        x = x_rows.index_select(0, idx).view(K, -1, d_in)
        record: list | None = [] if probe else None
        out = forward(x, record)
        loss = loss_per_job(out, y_rows.index_select(0, idx).view(K, -1, *d_out), classes)
        if t == 0:
            init_loss = loss.detach().clone()
            input_q = x.pow(2).mean(dim=(1, 2))
        # Divergence is checked every step (a CPU-GPU sync point, cheap next to a step).
        bad = active & ~(torch.isfinite(loss) & (loss <= divergence_ratio * init_loss))
        if bool(bad.any()):
            for k in torch.nonzero(bad).flatten().tolist():
                diverged_at[k] = t
            active &= ~bad
        losses[t] = torch.where(active | bad, loss.detach(), torch.full_like(loss, float("nan")))
        for p in params:
            p.grad = None
        # A job diverging now still gets this step's gradient, probes and validation pass: its record
        # describes the state it diverged from (at step 0, its initialization). Only then is it retired.
        torch.where(active | bad, loss, torch.zeros_like(loss)).sum().backward()
        if probe:  # the state this step starts from: parameters, their gradients, activations
            with torch.no_grad():
                _probe(layer_stats[li], grad_norm[li], W, B, record, units=li in (0, n_log - 1))
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
        before = flat.clone() if probe and t < steps else None
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
    return BundleOutput(log_steps=log_steps, losses=losses.cpu().numpy(), val_loss=val_loss.cpu().numpy(),
                        val_acc=val_acc.cpu().numpy(), grad_norm=grad_norm.cpu().numpy(),
                        layer_stats=layer_stats.cpu().numpy(), diverged_at=diverged_at,
                        init_loss=init_loss.cpu().numpy(), input_q=input_q.cpu().numpy(),
                        null_loss=np.array([d.null_loss for d in data]),
                        dims=models.layer_dims(data[0].d_in, data[0].d_out, ref.depth, ref.width),
                        final_params=final)


def _probe(out: torch.Tensor, grad_norm: torch.Tensor, W: list, B: list, record: list, *,
           units: bool) -> None:
    """Fill one probe step's stats ``out`` (K, depth, kinds, stats) and whole-gradient norms (K,).

    ``units``: also measure each hidden layer's unit diversity (``distinct_frac``), which the
    metrics read at step 0 and at the last logged step only.
    """
    _fill_probe(out, grad_norm, W, B, record, torch.float32)
    # Statistics of a finite tensor stay finite: where float32 sums overflowed (finite absmax,
    # non-finite mean, std or norm), the jobs concerned are measured again in float64.
    first4 = out[..., :4]
    redo = (torch.isfinite(first4[..., 2]) & ~torch.isfinite(first4).all(-1)).flatten(1).any(1)
    if bool(redo.any()):
        wide = torch.full_like(out, float("nan"), dtype=torch.float64)
        wide_grad = torch.zeros_like(grad_norm, dtype=torch.float64)
        _fill_probe(wide, wide_grad, W, B, record, torch.float64)
        out[redo] = wide[redo].to(out.dtype)
        grad_norm[redo] = wide_grad[redo].to(grad_norm.dtype)
    if units:
        w_kind, col = KINDS.index("weight"), STATS.index("distinct_frac")
        for i in range(len(W) - 1):  # hidden layers; output units are not interchangeable
            out[:, i, w_kind, col] = distinct_frac(W[i], B[i])


def _fill_probe(out: torch.Tensor, grad_norm: torch.Tensor, W: list, B: list, record: list,
                dtype: torch.dtype) -> None:
    sq = torch.zeros(out.shape[0], device=out.device, dtype=dtype)
    for i, (w, b) in enumerate(zip(W, B)):
        for kind, p in ((0, w), (1, b)):
            out[:, i, kind, :4] = _stats(p, dtype)
            g = torch.linalg.vector_norm(p.grad.flatten(1), dim=1, dtype=dtype)
            out[:, i, kind, 4] = g
            sq += g**2
        z, h = record[i]
        out[:, i, 3, :4] = _stats(z, dtype)
        # Activation "norm" is the RMS over the batch of each sample's vector norm.
        out[:, i, 3, 3] = _rms_norm(z, dtype)
        if h is not None:
            out[:, i, 2, :4] = _stats(h, dtype)
            out[:, i, 2, 3] = _rms_norm(h, dtype)
            out[:, i, 2, 6] = (h.detach() == 0).all(dim=1).float().mean(-1)
    grad_norm.copy_(sq.sqrt())


def param_count(job: Job, d_in: int, d_out: int) -> int:
    """Number of parameters of one job's model (for cost estimates)."""
    dims = models.layer_dims(d_in, d_out, job.depth, job.width)
    return sum(a * b + b for a, b in zip(dims, dims[1:]))


def flops_per_step(job: Job, d_in: int, d_out: int) -> float:
    """Approximate training FLOPs of one step of one job: 6 x batch x weights (fwd + 2 bwd matmuls)."""
    dims = models.layer_dims(d_in, d_out, job.depth, job.width)
    return 6.0 * job.batch_size * sum(a * b for a, b in zip(dims, dims[1:]))
