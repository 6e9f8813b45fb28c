"""Built-in data sets and user data factories.

A task returns ``(x_train, y_train, x_val, y_val)``, optionally followed by a dict of what
it declares about itself (``{"classes": vocabulary size, "loss_floor": best possible loss}``).
Inputs keep their per-sample shape ((N, 64) rows, (N, 1, 8, 8) images, (N, T) token ids);
integer inputs stay integer (int64), others become float32. Targets decide the loss:
integer class indices (N,) or per-token (N, T) mean cross-entropy (over tokens too), float
targets (N, d) or (N,) mean MSE. A task's identity never changes with the seed (the teacher
network is fixed by the task's own settings); the seed draws the sample where a task samples
its data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench import factories
from bench.errors import is_number
from bench.train import markov as markov_task
from bench.train.seeds import derive_seed


class TaskError(Exception):
    """A task (usually a user factory) produced unusable data: the job fails with this message."""


@dataclass(frozen=True)
class TaskData:
    """One job's data, checked (:func:`load`).

    ``x_*``: (N, *in_shape), float32 or int64 (token ids). ``y_*``: int64 class indices (N,) or
    per-token (N, T), or float32 regression targets (N, d). ``classes``: the number of classes
    (the vocabulary for tokens), None for regression. ``loss_floor``: the lowest loss any model
    can reach, where the task knows it (markov: the chain's entropy rate), else None.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    classes: int | None
    loss_floor: float | None = None

    @property
    def in_shape(self) -> tuple[int, ...]:
        """One sample's input shape: (64,), (1, 8, 8), (T,) for T tokens."""
        return tuple(self.x_train.shape[1:])

    @property
    def out_dim(self) -> int:
        """Outputs a model predicts per sample (per token): the classes, or the regression width."""
        return self.classes if self.classes is not None else self.y_train.shape[1]

    @property
    def per_token(self) -> bool:
        """Targets are (N, T) class indices: one label per position, the loss averaged over positions."""
        return self.classes is not None and self.y_train.dim() == 2

    @property
    def d_in(self) -> int:
        """Input features of a flattened sample (what an MLP's first layer reads): prod(in_shape)."""
        return math.prod(self.in_shape)

    @property
    def d_out(self) -> int:
        """The MLP's output width: :attr:`out_dim`."""
        return self.out_dim

    @property
    def null_loss(self) -> float:
        """Training loss of the best predictor that ignores its input (the null model).

        Regression: the MSE of predicting the training targets' mean (their variance, averaged
        over outputs). Classification: the cross-entropy of predicting the training set's class
        frequencies (their entropy, in nats); with per-token targets, the frequencies of all
        target tokens (a model that ignores its context). A network that learns only its output
        bias reaches this loss, and no lower: ``stalled`` is judged against it (README, "Metrics").
        """
        y = self.y_train
        if self.classes is None:
            return float(((y.double() - y.double().mean(0)) ** 2).mean())
        p = torch.bincount(y.flatten(), minlength=self.classes).double() / y.numel()
        p = p[p > 0]
        return float(-(p * p.log()).sum())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def teacher(seed: int, *, input_dim: int, output_dim: int, n_train: int, n_val: int, noise: float,
            teacher_depth: int, teacher_width: int, teacher_seed: int) -> tuple:
    """Regression on a fixed random tanh teacher network; inputs x ~ N(0, I) drawn by the seed."""
    g_teacher = _gen(teacher_seed)
    dims = [input_dim, *([teacher_width] * (teacher_depth - 1)), output_dim]
    weights = [torch.randn(a, b, generator=g_teacher) * (1.5 / math.sqrt(a))
               for a, b in zip(dims, dims[1:], strict=False)]

    def net(x: torch.Tensor) -> torch.Tensor:
        for i, w in enumerate(weights):
            x = x @ w
            if i < len(weights) - 1:
                x = torch.tanh(x)
        return x

    # Scale targets to unit variance on a reference sample that depends on the teacher only.
    scale = net(torch.randn(4096, input_dim, generator=_gen(teacher_seed + 1))).std()
    g = _gen(derive_seed(seed, "data"))
    x = torch.randn(n_train + n_val, input_dim, generator=g)
    y = net(x) / scale + noise * torch.randn(n_train + n_val, output_dim, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def spirals(seed: int, *, n_train: int, n_val: int, noise: float, turns: float) -> tuple:
    """Two interleaved spirals in the plane (2 classes); the seed draws the points."""
    g = _gen(derive_seed(seed, "data"))
    n = n_train + n_val
    label = torch.randint(0, 2, (n,), generator=g)
    t = torch.rand(n, generator=g) * turns * 2 * math.pi
    r = t / (turns * 2 * math.pi)
    angle = t + math.pi * label
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    x = (x + noise * torch.randn(n, 2, generator=g) * 0.1) / 0.5
    return x[:n_train], label[:n_train], x[n_train:], label[n_train:]


def digits(seed: int, *, n_val: int, split_seed: int, images: bool = False) -> tuple:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download), standardized.

    The split is part of the task's identity (``split_seed``), not of the job's seed. Inputs are
    (N, 64) rows, or with ``images`` (N, 1, 8, 8) one-channel images (the same numbers).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=_gen(split_seed))
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    if images:
        x = x.view(-1, 1, 8, 8)
    return x[train], y[train], x[val], y[val]


def blog(seed: int) -> tuple:
    """The tutorial's ten samples, y = x1 + x2 ([1, 2] -> 3, ..., [10, 9] -> 19); val = train."""
    x = torch.tensor([[1.0, 2.0], [2.0, 1.0], [3.0, 4.0], [4.0, 3.0], [5.0, 6.0], [6.0, 5.0],
                      [7.0, 8.0], [8.0, 7.0], [9.0, 10.0], [10.0, 9.0]])
    y = x.sum(dim=1, keepdim=True)
    return x, y, x.clone(), y.clone()


def markov(seed: int, **settings: Any) -> tuple:
    """Next-token prediction on a fixed random Markov chain (:mod:`bench.train.markov`).

    Declares its vocabulary (a token the sample misses is still a class) and its loss floor,
    the exact minimum mean cross-entropy over a sequence's positions.
    """
    chain = markov_task.check(**settings)
    return (*markov_task.markov(seed, **settings),
            {"classes": settings["vocab"], "loss_floor": chain.loss_floor(settings["seq_len"])})


# The loaders, keyed by the names bench.train.names.TASKS declares (with their settings and checks);
# tests/test_layers.py asserts the two hold the same names.
TASKS: dict[str, Callable[..., tuple]] = {
    "teacher": teacher,
    "spirals": spirals,
    "digits": digits,
    "blog": blog,
    "markov": markov,
}


@functools.lru_cache(maxsize=64)
def _load_cached(name: str, params: tuple, seed: int) -> TaskData:
    loader = factories.load(name, "task") if ":" in name else TASKS[name]
    out = loader(seed=seed, **dict(params))
    return _check(name, out)


def load(name: str, params: tuple[tuple[str, Any], ...], seed: int) -> TaskData:
    """Load a task's data for one job seed (cached per process)."""
    return _load_cached(name, params, seed)


def _check(name: str, out: Any) -> TaskData:
    """A task's output as :class:`TaskData`, or a TaskError naming the task and what is wrong."""
    declared: dict[str, Any] = {}
    if isinstance(out, (tuple, list)) and len(out) == 5 and isinstance(out[4], dict):
        out, declared = out[:4], out[4]
    if not isinstance(out, (tuple, list)) or len(out) != 4 or not all(torch.is_tensor(t) for t in out):
        raise TaskError(f"task {name!r} must return 4 tensors (x_train, y_train, x_val, y_val), "
                        "optionally followed by a dict {'classes': int, 'loss_floor': float}")
    unknown = sorted(set(declared) - {"classes", "loss_floor"})
    if unknown:
        raise TaskError(f"task {name!r} declares unknown keys {unknown}; "
                        "choose from ['classes', 'loss_floor']")
    x_tr, y_tr, x_va, y_va = (t.detach().cpu() for t in out)
    if min(t.dim() for t in (x_tr, y_tr, x_va, y_va)) == 0:
        raise TaskError(f"task {name!r}: x and y need a sample dimension (got a 0-d tensor)")
    if len(x_tr) != len(y_tr) or len(x_va) != len(y_va) or len(x_tr) == 0 or len(x_va) == 0:
        raise TaskError(f"task {name!r}: x and y lengths differ or a split is empty "
                        f"({len(x_tr)}/{len(y_tr)} train, {len(x_va)}/{len(y_va)} val)")
    x_tr, x_va = _inputs(name, x_tr, x_va)
    if y_tr.dtype.is_floating_point or y_va.dtype.is_floating_point:
        y_tr, y_va = _regression_targets(name, y_tr, y_va)
        if declared.get("classes") is not None:
            raise TaskError(f"task {name!r} declares classes = {declared['classes']!r} but its targets are "
                            f"floats ({y_tr.dtype}): regression has no classes")
        classes = None
    else:
        y_tr, y_va, classes = _class_targets(name, y_tr, y_va, declared.get("classes"))
    floor = declared.get("loss_floor")
    if floor is not None and not (is_number(floor) and floor >= 0):
        raise TaskError(f"task {name!r} declares loss_floor = {floor!r}: expected a finite number >= 0")
    return TaskData(x_tr, y_tr, x_va, y_va, classes, None if floor is None else float(floor))


def _same_per_sample(name: str, what: str, train: torch.Tensor, val: torch.Tensor) -> None:
    if train.shape[1:] != val.shape[1:]:
        raise TaskError(f"task {name!r}: {what}_val samples have shape {tuple(val.shape[1:])} but "
                        f"{what}_train samples {tuple(train.shape[1:])}")


def _inputs(name: str, x_tr: torch.Tensor, x_va: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs keep their per-sample shape: integer ones (token ids) as int64, the rest as float32."""
    kinds = []
    for x in (x_tr, x_va):
        if x.dtype.is_complex:
            raise TaskError(f"task {name!r}: inputs must be real numbers or integers, not {x.dtype}")
        kinds.append("float" if x.dtype.is_floating_point or x.dtype == torch.bool else "integer")
    if kinds[0] != kinds[1]:
        raise TaskError(f"task {name!r}: x_train is {x_tr.dtype} but x_val is {x_va.dtype}: "
                        "both must be floats or both integers")
    if kinds[0] == "integer":
        x_tr, x_va = x_tr.long(), x_va.long()
    else:
        x_tr, x_va = x_tr.float(), x_va.float()
        if not (torch.isfinite(x_tr).all() and torch.isfinite(x_va).all()):
            raise TaskError(f"task {name!r}: inputs contain NaN or inf")
    # One number per sample is one feature: (N,) is (N, 1).
    x_tr, x_va = (x.unsqueeze(1) if x.dim() == 1 else x for x in (x_tr, x_va))
    _same_per_sample(name, "x", x_tr, x_va)
    return x_tr, x_va


def _regression_targets(name: str, y_tr: torch.Tensor,
                        y_va: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float targets as float32 (N, d); (N,) is (N, 1)."""
    if not (y_tr.dtype.is_floating_point and y_va.dtype.is_floating_point):
        raise TaskError(f"task {name!r}: y_train is {y_tr.dtype} but y_val is {y_va.dtype}: both must be "
                        "floats (regression) or both integers (classes)")
    y_tr, y_va = (y.float().unsqueeze(1) if y.dim() == 1 else y.float() for y in (y_tr, y_va))
    if y_tr.dim() != 2:
        raise TaskError(f"task {name!r}: float (regression) targets must be (N,) or (N, d), "
                        f"got y_train of shape {tuple(y_tr.shape)}")
    _same_per_sample(name, "y", y_tr, y_va)
    if y_tr.shape[1] == 0:
        raise TaskError(f"task {name!r}: regression targets have no outputs (shape {tuple(y_tr.shape)})")
    if not (torch.isfinite(y_tr).all() and torch.isfinite(y_va).all()):
        raise TaskError(f"task {name!r}: targets contain NaN or inf")
    return y_tr, y_va


def _class_targets(name: str, y_tr: torch.Tensor, y_va: torch.Tensor,
                   declared: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Class indices as int64, (N,) or per-token (N, T); the classes declared or max + 1."""
    if y_tr.dtype.is_complex or y_va.dtype.is_complex:
        raise TaskError(f"task {name!r}: targets must be class indices (integers) or floats, "
                        f"not {y_tr.dtype} / {y_va.dtype}")
    if y_tr.dim() > 2:
        raise TaskError(f"task {name!r}: class targets must be (N,) indices or per-token (N, T), "
                        f"got y_train of shape {tuple(y_tr.shape)}")
    y_tr, y_va = y_tr.long(), y_va.long()
    _same_per_sample(name, "y", y_tr, y_va)
    if y_tr.numel() == 0:
        raise TaskError(f"task {name!r}: per-token targets have no tokens (shape {tuple(y_tr.shape)})")
    low = min(int(y_tr.min()), int(y_va.min()))
    if low < 0:
        raise TaskError(f"task {name!r}: class labels must be >= 0 (found {low})")
    seen = max(int(y_tr.max()), int(y_va.max())) + 1
    if declared is None:
        return y_tr, y_va, seen
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < seen:
        raise TaskError(f"task {name!r} declares classes = {declared!r}: expected an integer >= {seen} "
                        f"(its largest label + 1)")
    return y_tr, y_va, declared


def batch_schedule(seed: int, n: int, batch_size: int, steps: int) -> torch.Tensor:
    """The sample indices of every step (``steps + 1`` rows): reshuffled epochs, last partial batch dropped.

    Both the stacked engine and the plain reference loop use this, so their batches are identical.
    A batch larger than the data set is the whole data set.
    """
    b = min(batch_size, n)
    per_epoch = n // b
    g = _gen(derive_seed(seed, "batches"))
    epochs = -(-(steps + 1) // per_epoch)
    rows = [torch.randperm(n, generator=g)[: per_epoch * b].view(per_epoch, b) for _ in range(epochs)]
    return torch.cat(rows)[: steps + 1]
