"""The engine for any ``nn.Module``: K jobs as ``vmap(functional_call)`` over one flat parameter buffer.

Each job's model is built and initialized as a real module with its own seed
(:func:`bench.train.bundle.build_model`), exactly as a classic loop would. Their parameters
are then stacked into one flat (K, P) buffer whose per-parameter (K, ...) views are autograd
leaves, their buffers (BatchNorm running statistics) stacked per job, and the forward pass is
``torch.func.vmap`` over ``functional_call`` on a real base copy of the module (a copy on the
meta device would untie tied weights: research/anymodule.md). Per-job losses are summed and
back-propagated with plain autograd (each job's gradient is its own), and the flat optimizer
(:class:`bench.train.optim.FlatOptimizer`) updates every job at once.

``vectorize=False`` is the per-job loop: the same code with the module called directly on one
job at a time, its random draws (dropout) seeded by the job. :func:`train` decides between
them with a preflight: one step of the whole bundle through vmap against two of its jobs
through the loop, for exactness and for speed (:func:`preflight`).

Probes (step 0, every ``log_every`` steps, after the last update) record every parameter's
statistics under its module's name, and every catalogued module's output statistics through
forward hooks that return them out of the vmapped function.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import schema
from bench.job import Job
from bench.schema import STATS
from bench.train import activations, architectures, residual_inits, tasks
from bench.train.bundle import (
    BundleOutput,
    TraceRow,
    build_model,
    logged_steps,
    loss_per_job,
    mark_divergence,
)
from bench.train.optim import FlatOptimizer
from bench.train.probes import catalog, distinct_frac, stats

BLOCK = re.compile(schema.BLOCK)  # residual blocks: the stream after each is probed
ACTIVATION_TYPES = tuple({type(a.module()) for a in activations.ACTIVATIONS.values()} - {nn.Identity}) + (
    nn.SiLU, nn.Softplus, nn.ELU, nn.Mish, nn.Hardtanh, nn.ReLU6, nn.PReLU)
PREFLIGHT_RTOL = 1e-4  # one step of the bundle must match the plain loop this closely


class FallBack(Exception):
    """The bundle cannot be vectorized exactly: train its jobs one at a time (the reason is kept)."""


def _probed(model: nn.Module) -> list[str]:
    """Modules whose outputs the probes describe: every catalogued module and every residual block."""
    names = [row["name"] for row in catalog(model)]
    return names + [n for n, _ in model.named_modules() if BLOCK.fullmatch(n) and n not in names]


def forward_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Module names in the order a forward pass on ``x`` calls them (forward pre-hooks)."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: order.append(n))
               for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(x)
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def _output_stats(t: torch.Tensor, act: bool) -> torch.Tensor:
    """One module output's statistics (one job's view inside vmap): the STATS row, NaN where undefined."""
    t = t.detach()
    if not torch.is_floating_point(t):
        return torch.full((len(STATS),), float("nan"))
    flat = t.flatten()
    n = flat.numel()
    mean = flat.mean()
    norm = torch.linalg.vector_norm(flat)
    std = ((norm * norm - n * mean * mean).clamp_min(0) / max(n - 1, 1)).sqrt()
    absmax = flat.abs().amax()
    rms = t.flatten(1).pow(2).sum(-1).mean().sqrt() if t.dim() > 1 else norm
    parts = [mean, std, absmax, rms]
    row = torch.stack(parts + [torch.full_like(mean, float("nan"))] * (len(STATS) - 4))
    if act and t.dim() > 1:  # a unit is dead when it is zero for every sample of the batch
        dead = (t == 0).all(dim=0).float().mean()
        row = torch.cat([row[:STATS.index("dead_frac")], dead.unsqueeze(0).to(row.dtype),
                         row[STATS.index("dead_frac") + 1:]])
    return row


class _Bundle:
    """K built models as one flat buffer, stacked buffers and a base module to call functionally."""

    def __init__(self, models: list[nn.Module], device: torch.device):
        # On the CPU, the first job's own module, not a copy (deepcopy was 8 % of a small job's time
        # in the loop): functional_call restores what it swaps in, :meth:`unbind` what the loop
        # binds. Elsewhere a copy: Module.to moves in place, and the built models (on the CPU) are
        # read again (the preflight's fits, then training). Real tensors, not the meta device's:
        # tied weights stay tied.
        self.base = models[0] if device.type == "cpu" else copy.deepcopy(models[0]).to(device)
        self.names = [n for n, _ in self.base.named_parameters()]  # a shared parameter appears once
        self.shapes = [p.shape for _, p in self.base.named_parameters()]
        rows = []
        for m in models:
            own = dict(m.named_parameters())
            rows.append(torch.cat([own[n].detach().flatten() for n in self.names]))
        self.flat = torch.stack(rows).to(device)
        self.views, self.offsets, at = {}, [], 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape)) if len(shape) else 1
            self.views[name] = self.flat[:, at:at + size].view(len(models), *shape).requires_grad_()
            self.offsets.append((at, at + size))
            at += size
        buffer_names = [n for n, _ in self.base.named_buffers()]
        self.buffers = {n: torch.stack([dict(m.named_buffers())[n].detach() for m in models]).to(device)
                        for n in buffer_names}
        # Where each parameter and buffer sits in the base module (a tied one at every place it is
        # used): the per-job loop binds a job's tensors there directly, where functional_call would
        # swap them in and out at every call (about 15 % of a small model's step); :meth:`unbind`
        # puts the originals back when the fit ends.
        canonical = {id(p): n for n, p in self.base.named_parameters()}
        self.param_slots = [(m, leaf, canonical[id(p)]) for m in self.base.modules()
                            for leaf, p in m._parameters.items() if p is not None]
        canonical = {id(b): n for n, b in self.base.named_buffers()}
        self.buffer_slots = [(m, leaf, canonical[id(b)]) for m in self.base.modules()
                             for leaf, b in m._buffers.items() if b is not None]

        self.originals = [(m._parameters, leaf, m._parameters[leaf]) for m, leaf, _ in self.param_slots] + \
            [(m._buffers, leaf, m._buffers[leaf]) for m, leaf, _ in self.buffer_slots]

    def bind(self, k: int) -> None:
        """Make job k's parameter views and buffers the base module's own (the per-job loop)."""
        params = {n: v[k] for n, v in self.views.items()}  # one tensor per name: tied stay tied
        buffers = {n: b[k] for n, b in self.buffers.items()}
        for module, leaf, name in self.param_slots:
            module._parameters[leaf] = params[name]
        for module, leaf, name in self.buffer_slots:
            module._buffers[leaf] = buffers[name]

    def unbind(self) -> None:
        """Give the base module its own parameters and buffers back (the built model is reused)."""
        for table, leaf, tensor in self.originals:
            table[leaf] = tensor

    def grad(self) -> torch.Tensor:
        return torch.cat([(self.views[n].grad if self.views[n].grad is not None
                           else torch.zeros_like(self.views[n])).flatten(1) for n in self.names], dim=1)


_FASTPATH = threading.Lock()
_fastpath_users: list[bool] = []  # one entry per vmapped call in flight; the first holds the saved flag


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """nn.MultiheadAttention without its fused inference path (``_native_multi_head_attention``,
    taken in eval mode, e.g. the validation pass): vmap has no batching rule for it, so a
    transformer with a boolean mask fell back to the loop. The unfused path computes the same.
    The flag is process-wide: bundles trained by concurrent threads share it, so the last one out
    restores it."""
    with _FASTPATH:
        _fastpath_users.append(torch.backends.mha.get_fastpath_enabled())
        torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        with _FASTPATH:
            saved = _fastpath_users.pop()
            if not _fastpath_users:
                torch.backends.mha.set_fastpath_enabled(saved)


def _call(bundle: _Bundle, x: torch.Tensor, probe: list[str] | None, acts: set[str], vectorize: bool,
          math_attention: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every job's output on its own batch x (K, B, ...), and the probed modules' output stats (K, S)."""
    base = bundle.base

    def one(params: dict | None, buffers: dict | None, xb: torch.Tensor):
        """One job's forward: functionally on (params, buffers), or on the tensors bound (None)."""
        captured: dict[str, torch.Tensor] = {}
        handles = []
        if probe:
            modules = dict(base.named_modules())
            for name in probe:
                def hook(mod, args, out, name=name):
                    if isinstance(out, torch.Tensor):
                        captured[name] = _output_stats(out, name in acts)
                handles.append(modules[name].register_forward_hook(hook))
        try:
            out = (base(xb) if params is None else
                   functional_call(base, (params, buffers), (xb,), tie_weights=True, strict=False))
        finally:
            for h in handles:
                h.remove()
        return out, captured

    # On the CPU, the vmapped forward runs attention through PyTorch's math kernel: the fused CPU
    # kernel (flash attention) has no vmap batching rule, so vmap would run it job by job, while
    # the math path is batched matmuls and a softmax (research/anymodule.md section 1: 1.1-1.5x
    # faster under vmap). The preflight's lone jobs use it too (``math_attention``), so that it
    # compares batching alone: with flash there, Adam's first step turned the kernels' ~1e-7
    # differences in near-zero gradients into lr-sized ones. A job the loop trains keeps the fused
    # kernel, as the user's own loop would (1.2x faster here); the kernels agree to ~1e-6. CUDA's
    # fused kernels have batching rules: kept there.
    math = x.device.type == "cpu" and (vectorize or math_attention)
    kernels = sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()
    if vectorize:
        with kernels, _mha_fastpath_off():
            return vmap(one, in_dims=(0, 0, 0), randomness="error")(bundle.views, bundle.buffers, x)
    # The loop: job 0 alone (a bundle of one), called directly; its outputs and stats get K = 1.
    bundle.bind(0)  # fresh views every call: each step's graph starts at the leaves
    with kernels:
        out, captured = one(None, None, x[0])
    return out.unsqueeze(0), {n: s.unsqueeze(0) for n, s in captured.items()}


def _fit(jobs: list[Job], data: list[tasks.TaskData], built: list[nn.Module], *, divergence_ratio: float,
         device: str, probes: bool, keep_params: bool, vectorize: bool,
         steps: int | None = None, clock: list[float] | None = None, keep_first: int = 0,
         math_attention: bool = False) -> BundleOutput:
    """Train a bundle (``vectorize``) or a single job (not) for ``steps`` (default: the jobs' own).

    ``clock``, when given, receives the wall time (s) at which step 0 starts and each step ``t`` =
    0 .. steps ends (after the device finished it), for the preflight's timing. ``keep_first``
    keeps the final parameters of the first jobs only (``keep_params`` keeps every job's);
    ``math_attention`` runs the per-job loop's attention through the math kernel, as vmap's.
    """
    ref = jobs[0]
    K, L = len(jobs), ref.log_every
    steps = ref.steps if steps is None else steps
    dev = torch.device(device)
    bundle = _Bundle(built, dev)
    opt = FlatOptimizer(jobs, bundle.flat, _lr_scale(jobs, built, bundle), _wd_scale(jobs, built, bundle))
    classes = data[0].classes
    first = tasks.batch_schedule(ref.seed, len(data[0].x_train), ref.batch_size, 0)[0]
    order = forward_order(built[0], data[0].x_train[first])
    cat = catalog(built[0], order)
    probed = _probed(built[0])
    rank = {n: i for i, n in enumerate(order)}
    probed.sort(key=lambda n: rank.get(n, len(rank)))
    index = {row["name"]: row["index"] for row in cat}
    for n in probed:  # residual blocks are catalogued too (they hold the stream)
        if n not in index:
            index[n] = len(index)
            cat.append({"name": n, "type": type(dict(built[0].named_modules())[n]).__name__, "shapes": "",
                        "fan_in": float("nan"), "fan_out": float("nan"), "index": index[n]})
    cat.sort(key=lambda r: rank.get(r["name"], len(rank) + r["index"]))
    for i, row in enumerate(cat):
        row["index"] = i
    index = {row["name"]: row["index"] for row in cat}
    modules = dict(built[0].named_modules())
    acts = {n for n in probed if isinstance(modules[n], ACTIVATION_TYPES)}
    owner = {n: n.rpartition(".")[0] for n in bundle.names}  # parameter -> its module's name
    weights = [n for n in bundle.names if bundle.views[n].dim() >= 3]  # (K, out, ...) matrices
    unit_layers = weights[:-1]  # units of the last layer (the head) are not interchangeable
    rows = [TraceRow(owner[n], index.get(owner[n], -1), n.rpartition(".")[2]) for n in bundle.names]
    rows += [TraceRow(n, index[n], "act" if n in acts else "output") for n in probed]
    order_rows = sorted(range(len(rows)), key=lambda i: (rows[i].index, i))
    rows = [rows[i] for i in order_rows]
    where = {(r.module, r.param): i for i, r in enumerate(rows)}

    x_train = torch.stack([d.x_train for d in data]).to(dev)
    y_train = torch.stack([d.y_train for d in data]).to(dev)
    x_val = torch.stack([d.x_val for d in data]).to(dev)
    y_val = torch.stack([d.y_val for d in data]).to(dev)
    n = x_train.shape[1]
    schedule = torch.stack([tasks.batch_schedule(j.seed, n, j.batch_size, steps) for j in jobs], 1).to(dev)
    # Every step's batch as row numbers into the (K * n, ...) data: one index_select per step.
    schedule += n * torch.arange(K, device=dev)[:, None]
    x_rows, y_rows = x_train.flatten(0, 1), y_train.flatten(0, 1)

    log_steps = logged_steps(steps, L)
    n_log = len(log_steps)
    losses = torch.full((steps + 1, K), float("nan"), device=dev)
    val_loss = torch.full((n_log, K), float("nan"), device=dev)
    val_acc = torch.full((n_log, K), float("nan"), device=dev)
    grad_norm = torch.full((n_log, K), float("nan"), device=dev)
    row_stats = torch.full((n_log, K, len(rows), len(STATS)), float("nan"), device=dev, dtype=torch.float64)
    active = torch.ones(K, dtype=torch.bool, device=dev)
    diverged_at = np.full(K, -1)
    init_loss = torch.zeros(K, device=dev)
    input_q = torch.zeros(K, device=dev)
    li = 0
    bundle.base.train()  # every module, as the classic loop's model.train() would
    rng = torch.random.fork_rng(devices=[]) if not vectorize else None
    if rng is not None:  # the loop: the job's random draws (dropout) are its own, seeded
        rng.__enter__()
        torch.manual_seed(tasks.derive_seed(ref.seed, "train"))
    if clock is not None:
        clock.append(time.perf_counter())
    try:
        for t in range(steps + 1):
            logged = li < n_log and log_steps[li] == t
            probing = probes and logged
            idx = schedule[t].flatten()
            x = x_rows.index_select(0, idx).view(K, -1, *x_rows.shape[1:])
            y = y_rows.index_select(0, idx).view(K, -1, *y_rows.shape[1:])
            if not bundle.base.training:  # Module.train() walks every module: only when the mode changes
                bundle.base.train()
            out, captured = _call(bundle, x, probed if probing else None, acts, vectorize, math_attention)
            loss = loss_per_job(out, y, classes)
            if t == 0:
                init_loss = loss.detach().clone()
                input_q = x.float().pow(2).flatten(1).mean(1) if torch.is_floating_point(x) else input_q
            bad = mark_divergence(loss, init_loss, active, diverged_at, t, divergence_ratio)
            losses[t] = torch.where(active | bad, loss.detach(), torch.full_like(loss, float("nan")))
            for v in bundle.views.values():
                v.grad = None
            torch.where(active | bad, loss, torch.zeros_like(loss)).sum().backward()
            if probing:
                with torch.no_grad():
                    _probe(row_stats[li], grad_norm[li], bundle, captured, where, owner,
                           unit_layers if li in (0, n_log - 1) else [])
            if logged:
                with torch.no_grad():
                    bundle.base.eval()
                    vout, _ = _call(bundle, x_val, None, acts, vectorize, math_attention)
                    val_loss[li] = loss_per_job(vout, y_val, classes)
                    if classes is not None:
                        val_acc[li] = (vout.argmax(-1) == y_val).float().flatten(1).mean(1)
            for k in np.flatnonzero(diverged_at == t):
                opt.retire(int(k))
                for b in bundle.buffers.values():
                    if torch.is_floating_point(b):
                        b[k] = 0
            before = bundle.flat.clone() if probing and t < steps else None
            if t < steps:
                g = bundle.grad()
                if not bool(active.all()):  # a retired job's gradient can be NaN (0 x inf): no update
                    g[~active] = 0
                opt.step(g)
            if before is not None:
                with torch.no_grad():
                    delta = bundle.flat - before
                    for name, (a, b) in zip(bundle.names, bundle.offsets):
                        row_stats[li, :, where[(owner[name], name.rpartition(".")[2])],
                                  STATS.index("update_ratio")] = \
                            (delta[:, a:b].norm(dim=1) / before[:, a:b].norm(dim=1)).double()
            li += int(logged)
            if clock is not None:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                clock.append(time.perf_counter())
            if not bool(active.any()):
                break
    finally:
        bundle.unbind()
        if rng is not None:
            rng.__exit__(None, None, None)
    kept = K if keep_params else min(keep_first, K)
    final = [[bundle.views[n][k].detach().cpu().clone() for n in bundle.names] for k in range(kept)]
    return BundleOutput(log_steps=log_steps, losses=losses.cpu().numpy(), val_loss=val_loss.cpu().numpy(),
                        val_acc=val_acc.cpu().numpy(), grad_norm=grad_norm.cpu().numpy(), rows=rows,
                        row_stats=row_stats.cpu().numpy(), modules=cat, diverged_at=diverged_at,
                        init_loss=init_loss.cpu().numpy(), input_q=input_q.cpu().numpy(),
                        null_loss=np.array([d.null_loss for d in data]), dims=None, final_params=final,
                        streams=[architectures.stream_theory(m) for m in built])


def _lr_scale(jobs: list[Job], built: list[nn.Module], bundle: _Bundle) -> torch.Tensor | None:
    """(K, P) per-parameter learning-rate multipliers, for jobs whose scheme sets them (muP); else None."""
    return _per_parameter(jobs, built, bundle, residual_inits.mup_lr_multipliers)


def _wd_scale(jobs: list[Job], built: list[nn.Module], bundle: _Bundle) -> torch.Tensor | None:
    """(K, P) per-parameter weight-decay multipliers (muP's: the inverse of the lr's); else None."""
    return _per_parameter(jobs, built, bundle, residual_inits.mup_wd_multipliers)


def _per_parameter(jobs: list[Job], built: list[nn.Module], bundle: _Bundle,
                   multipliers: Callable[..., dict[str, float]]) -> torch.Tensor | None:
    if not any(hasattr(m, "mup_base_shapes") for m in built):
        return None
    rows = []
    for job, model in zip(jobs, built):
        mult = (multipliers(model, base_shapes=model.mup_base_shapes, optimizer=job.optimizer)
                if hasattr(model, "mup_base_shapes") else {})
        rows.append(torch.cat([torch.full((a_b[1] - a_b[0],), float(mult.get(n, 1.0)))
                               for n, a_b in zip(bundle.names, bundle.offsets)]))
    return torch.stack(rows)


def _probe(out: torch.Tensor, grad_norm: torch.Tensor, bundle: _Bundle, captured: dict,
           where: dict, owner: dict, unit_layers: list[str]) -> None:
    """Fill one probe step's rows (K, rows, STATS) and whole-gradient norms (K,)."""
    sq = torch.zeros(out.shape[0], device=out.device, dtype=torch.float64)
    for name in bundle.names:
        v = bundle.views[name]
        row = where[(owner[name], name.rpartition(".")[2])]
        values = stats(v.reshape(v.shape[0], -1), torch.float64) if v[0].numel() else None
        if values is not None:
            out[:, row, :4] = values
        g = v.grad if v.grad is not None else torch.zeros_like(v)
        gn = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1, dtype=torch.float64)
        out[:, row, STATS.index("grad_norm")] = gn
        sq += gn ** 2
    for name, value in captured.items():
        row = where[(name, "act")] if (name, "act") in where else where[(name, "output")]
        out[:, row] = value.to(out.dtype)
    for name in unit_layers:
        w = bundle.views[name].detach()
        bias = bundle.views.get(name.rpartition(".")[0] + ".bias")
        matrix = w.reshape(w.shape[0], w.shape[1], -1)  # (K, out, fan_in)
        b = bias.detach() if bias is not None and bias.shape[1:] == w.shape[1:2] else \
            torch.zeros(w.shape[:2], dtype=w.dtype, device=w.device)
        out[:, where[(owner[name], "weight")] if (owner[name], "weight") in where else
            where[(owner[name], name.rpartition(".")[2])], STATS.index("distinct_frac")] = \
            distinct_frac(matrix.transpose(1, 2), b).double()
    grad_norm.copy_(sq.sqrt())


def preflight(jobs: list[Job], data: list[tasks.TaskData], built: list[nn.Module], *,
              device: str = "cpu", timed: bool = True) -> str | None:
    """Why the bundle should train its jobs one at a time, or None when vmap is exact and no slower.

    Two steps of the whole bundle through ``vmap`` and of two of its jobs alone through the
    per-job loop. Reasons to fall back, in order: vmap raises (it cannot batch the module:
    ``.item()``, data-dependent control flow, random draws); vmap has no batching rule for an
    operator (it would run it job by job, with its own overhead on top); the two jobs' losses
    (and under SGD their updated parameters) differ by more than ``PREFLIGHT_RTOL``; or the loop
    is faster. Speed is step 1, a training step (forward, backward, update) without the
    validation pass of the logged steps 0 and 2 (with a validation set 8x the batch, that pass
    would decide alone): the bundle's time against K times the faster lone job's, all from this
    one call, so the machine's load at that moment weighs on both. ``timed=False`` checks
    exactness only.
    Out of memory is not a reason: it is raised, for the dispatcher to split the bundle.

    Raises:
        torch.OutOfMemoryError: the bundle does not fit on its device.
    """
    bundle_clock: list[float] = []
    pair = min(2, len(jobs))
    # Logged steps 0 and 2 whatever the jobs' log_every: step 1, the one timed, has no validation pass.
    jobs = [dataclasses.replace(j, log_every=2) for j in jobs]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            together = _fit(jobs, data, built, divergence_ratio=float("inf"), device=device, probes=False,
                            keep_params=False, keep_first=pair, vectorize=True, steps=2, clock=bundle_clock)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any other failure of the vectorized path is a reason
        return f"vmap raised {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    slow = [str(w.message) for w in caught if "not yet implemented the batching rule" in str(w.message)]
    if slow:  # vmap would run that operator job by job anyway, with its own overhead on top
        op = re.search(r"batching rule for (\S+?)\.", slow[0])
        return f"vmap has no batching rule for {op.group(1) if op else 'an operator'}: it would loop per job"
    alone_steps: list[float] = []
    for i in range(pair):
        clock: list[float] = []
        alone = _fit([jobs[i]], [data[i]], [built[i]], divergence_ratio=float("inf"), device=device,
                     probes=False, keep_params=True, vectorize=False, steps=2, clock=clock,
                     math_attention=True)
        alone_steps += np.diff(clock)[1:2].tolist()
        a, b = together.losses[:3, i], alone.losses[:3, 0]
        if not np.allclose(a, b, rtol=PREFLIGHT_RTOL, atol=1e-7, equal_nan=True):
            worst = np.nanmax(np.abs(a - b) / np.abs(b))
            return f"vmap's losses differ from the plain loop's (max rel {worst:.1e})"
        # Under Adam a parameter whose true gradient is 0 (a key bias: softmax ignores it) moves by
        # about lr on float noise alone, differently in each batching (research/anymodule.md): there
        # the losses are the check. Under SGD a step is proportional to its gradient: compare them.
        if jobs[i].optimizer != "sgd":
            continue
        for p, q in zip(together.final_params[i], alone.final_params[0]):
            if not torch.allclose(p, q, rtol=PREFLIGHT_RTOL, atol=1e-6, equal_nan=True):
                return "vmap's updated parameters differ from the plain loop's"
    if timed and len(bundle_clock) > 2 and alone_steps:  # a bundle that diverged at once stopped early
        bundle_step, loop_step = float(np.diff(bundle_clock)[1]), len(jobs) * min(alone_steps)
        if loop_step < bundle_step:
            return (f"the per-job loop was faster in the preflight ({len(jobs)} jobs one at a time: "
                    f"{loop_step * 1e3:.1f} ms a step; as one vmap bundle: {bundle_step * 1e3:.1f} ms)")
    return None


def train(jobs: list[Job], *, divergence_ratio: float = 10.0, device: str = "cpu", probes: bool = True,
          keep_params: bool = False, vectorize: bool | None = None,
          on_engine: Callable[[str, str], None] | None = None) -> list[BundleOutput]:
    """Train a bundle of jobs that share a shape; returns one output per engine run, in job order.

    Args:
        vectorize: True forces vmap, False the per-job loop, None (default) lets :func:`preflight` decide.
        on_engine: called with (engine, reason): ``("vmap", "")`` or ``("loop", why)``.

    Returns:
        One BundleOutput for the whole bundle (vmap), or one per job (the loop).
    """
    data = [tasks.load(j.task, j.task_params, j.seed) for j in jobs]
    built = [build_model(j, d) for j, d in zip(jobs, data)]
    if vectorize is None and len(jobs) == 1:
        # A bundle of one gains nothing from vmap (0.4-0.6x the plain loop's speed, docs/performance.md)
        # and would pay the preflight's fits on top.
        vectorize, reason = False, "a bundle of one job"
    elif vectorize is None:
        reason = preflight(jobs, data, built, device=device) or ""
        vectorize = not reason
    else:
        reason = "" if vectorize else "the per-job loop was asked for"
    if on_engine is not None:
        on_engine("vmap" if vectorize else "loop", reason)
    common = dict(divergence_ratio=divergence_ratio, device=device, probes=probes, keep_params=keep_params)
    if vectorize:
        return [_fit(jobs, data, built, vectorize=True, **common)]
    return [_fit([j], [d], [m], vectorize=False, **common) for j, d, m in zip(jobs, data, built)]
