"""Our ``mup`` scheme against the ``mup`` package itself (microsoft/mup, PyPI 1.0.0).

The same architecture is built twice from one seed: the mup way (PyTorch's default init, the head
swapped for ``mup.MuReadout``, ``mup.set_base_shapes(model, base, delta=delta)`` with
``rescale_params``; ``mup.MuSGD`` / ``mup.MuAdam`` with weight decay) and ours (``inits.apply(...,
"mup")``, the engine's per-parameter lr and weight-decay rows). Compared: every parameter at two
widths, each parameter's lr and weight decay in mup's param groups, and a few training steps'
losses. mup is installed with ``--no-deps`` (Makefile): its import needs only torch and pyyaml,
and its declared torchvision dependency would replace our torch build.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap

import mup
import numpy as np
import pytest
import torch
from torch import nn

from bench import spec
from bench.train import architectures as A
from bench.train import functional, inits, schemes, tasks
from bench.train import residual_inits as R
from bench.train.bundle import build_model, loss_per_job

torch.set_num_threads(1)
BASE = 16
IN, OUT = (12,), 5


class MLP(nn.Module):
    """A plain ReLU MLP following the convention muP needs: a ``head`` and its ``head_mult`` buffer."""

    def __init__(self, in_shape: tuple, out_dim: int, *, width: int, depth: int = 3):
        super().__init__()
        self.register_buffer("head_mult", torch.ones(()))
        dims = [math.prod(in_shape)] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(len(x), -1)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(h * self.head_mult)


ARCHS = {"mlp": MLP, "resmlp": lambda in_shape, out_dim, *, width: A.resmlp(in_shape, out_dim, depth=2,
                                                                            width=width)}


def ours(arch: str, width: int, seed: int, **params) -> nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch](IN, OUT, width=width)
    ctx = inits.InitContext("relu", schemes.resolve_params("mup", {"base_width": BASE, **params}),
                            rebuild=lambda width: ARCHS[arch](IN, OUT, width=width), width=width)
    inits.apply(model, "mup", ctx)
    return model


def mup_way(make, width: int, seed: int, readout_zero_init: bool = True) -> nn.Module:
    """The mup package's recipe. mup assumes PyTorch's default init; our scheme redraws that
    default (each module's reset_parameters, in ``modules()`` order) after the constructors, so
    this does the same, and both models use the same random numbers: they differ by muP alone."""
    torch.manual_seed(seed)
    model = make(width)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    head = mup.MuReadout(model.head.in_features, model.head.out_features, readout_zero_init=readout_zero_init)
    if not readout_zero_init:  # the drop-in keeps the Linear's default draw
        head.load_state_dict(model.head.state_dict())
    model.head = head
    with torch.device("meta"):
        base, delta = make(BASE), make(2 * BASE)
    return mup.set_base_shapes(model, base, delta=delta)  # rescale_params=True: biases and readout


def mup_make(arch: str):
    return lambda width: ARCHS[arch](IN, OUT, width=width)


@pytest.mark.parametrize("zero_readout", [True, False], ids=["zero-readout", "rescaled-readout"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_init_matches_set_base_shapes_at_two_widths(arch, zero_readout):
    stds = {}
    for width in (32, 128):  # width_mult 2 and 8
        a = ours(arch, width, seed=3, readout_zero_init=zero_readout)
        b = mup_way(mup_make(arch), width, seed=3, readout_zero_init=zero_readout)
        got, want = dict(a.named_parameters()), dict(b.named_parameters())
        assert list(got) == list(want)
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=0, msg=name)
        x = torch.randn(64, *IN)
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-7)  # head_mult = MuReadout's 1/width_mult
        stds[width] = {n: (float(got[n].std()), float(want[n].std())) for n in got if got[n].numel() > 1}
    # How each parameter's init scale moves with width: ours as mup's (hidden weights 1/sqrt(fan_in),
    # hidden biases constant, the readout 1/sqrt(base fan_in) or 0).
    for name, (ours32, mup32) in stds[32].items():
        ours128, mup128 = stds[128][name]
        if mup32 == 0:
            assert ours32 == ours128 == mup128 == 0, name
        else:
            assert ours128 / ours32 == pytest.approx(mup128 / mup32, rel=1e-6), name


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lr_and_weight_decay_match_mups_param_groups(arch, optimizer):
    lr, wd = 0.01, 0.1
    model = ours(arch, 64, seed=0)  # width_mult 4
    ref = mup_way(mup_make(arch), 64, seed=0)
    build = {"adam": mup.MuAdam, "sgd": mup.MuSGD}[optimizer]
    groups = build(ref.parameters(), lr=lr, weight_decay=wd).param_groups
    theirs = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    lr_mult = R.mup_lr_multipliers(model, base_shapes=model.mup_base_shapes, optimizer=optimizer)
    wd_mult = R.mup_wd_multipliers(model, base_shapes=model.mup_base_shapes, optimizer=optimizer)
    names = {id(p): n for n, p in ref.named_parameters()}
    assert set(names) == set(theirs)
    for key, (their_lr, their_wd) in theirs.items():
        name = names[key]
        assert lr * lr_mult[name] == pytest.approx(their_lr, rel=1e-12), name
        assert wd * wd_mult[name] == pytest.approx(their_wd, rel=1e-12), name
    assert len({m for m in lr_mult.values()}) > 1  # the multipliers are not all 1


JOB = """
[grid]
init = ["mup"]
seed = [0]
[model]
arch = "resmlp"
depth = 2
width = 64
[init_params.mup]
base_width = 16
[task]
name = "teacher"
n_train = 128
[train]
steps = 8
batch_size = 16
log_every = 4
optimizer = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 0.2
"""


def train_the_mup_way(job) -> tuple[list[float], nn.Module]:
    """A plain torch loop over the engine's batches, with mup's model and optimizer."""
    data = tasks.load(job.task, job.task_params, job.seed)
    model = mup_way(lambda width: A.resmlp(data.in_shape, data.out_dim, depth=job.depth, width=width),
                    job.width, seed=tasks.derive_seed(job.seed, "init"))
    if job.optimizer == "sgd":
        opt = mup.MuSGD(model.parameters(), lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay)
    else:
        opt = mup.MuAdam(model.parameters(), lr=job.lr, betas=job.betas, weight_decay=job.weight_decay)
    schedule = tasks.batch_schedule(job.seed, len(data.x_train), job.batch_size, job.steps)
    losses = []
    for t in range(job.steps):
        idx = schedule[t]
        opt.zero_grad()
        out = model(data.x_train[idx])
        loss = loss_per_job(out.unsqueeze(0), data.y_train[idx].unsqueeze(0), data.classes)[0]
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return losses, model


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_matches_mups_optimizers_with_weight_decay(optimizer):
    (job,) = spec.parse(textwrap.dedent(JOB)).jobs()
    if optimizer == "adam":
        job = dataclasses.replace(job, optimizer="adam", lr=0.005)
    start = build_model(job, tasks.load(job.task, job.task_params, job.seed))
    ref_losses, ref = train_the_mup_way(job)
    out = functional.train([job], keep_params=True, vectorize=False)[0]
    np.testing.assert_allclose(out.losses[:job.steps, 0], ref_losses, rtol=1e-4, atol=1e-7)
    assert ref_losses[-1] < 0.9 * ref_losses[0]  # it trains, so the comparison means something
    if optimizer == "sgd":  # Adam turns float noise in near-zero gradients into lr-sized steps
        for got, (name, want) in zip(out.final_params[0], ref.named_parameters(), strict=True):
            torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-6, msg=name)
    assert [n for n, _ in start.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert float(start.head_mult) == 16 / 64 and float(ref.head_mult) == 1.0  # MuReadout divides instead
