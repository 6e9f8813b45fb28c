"""Built-in data sets and user data factories.

A task returns ``(x_train, y_train, x_val, y_val)``; integer targets mean
classification (cross-entropy), float targets regression (MSE). A task's
identity never changes with the seed (the teacher network is fixed by the
task's own settings); the seed draws the sample where a task samples its data.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench import factories
from bench.errors import UserError, is_number


class TaskError(Exception):
    """A task (usually a user factory) produced unusable data: the job fails with this message."""


@dataclass(frozen=True)
class TaskData:
    """One job's data; ``classes`` is the number of classes, or None for regression."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    classes: int | None

    @property
    def d_in(self) -> int:
        return self.x_train.shape[1]

    @property
    def d_out(self) -> int:
        return self.classes if self.classes is not None else self.y_train.shape[1]

    @property
    def null_loss(self) -> float:
        """Training loss of the best predictor that ignores its input (the null model).

        Regression: the MSE of predicting the training targets' mean (their variance, averaged
        over outputs). Classification: the cross-entropy of predicting the training set's class
        frequencies (their entropy, in nats). A network that learns only its output bias reaches
        this loss, and no lower: ``stalled`` is judged against it (README, "Metrics").
        """
        y = self.y_train
        if self.classes is None:
            return float(((y.double() - y.double().mean(0)) ** 2).mean())
        p = torch.bincount(y.flatten(), minlength=self.classes).double() / y.numel()
        p = p[p > 0]
        return float(-(p * p.log()).sum())


def derive_seed(seed: int, stream: str) -> int:
    """An independent seed for one random stream (init, data, batches) of a job's seed."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


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


def digits(seed: int, *, n_val: int, split_seed: int) -> tuple:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download), standardized.

    The split is part of the task's identity (``split_seed``), not of the job's seed.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=_gen(split_seed))
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return x[train], y[train], x[val], y[val]


def blog(seed: int) -> tuple:
    """The tutorial's ten samples, y = x1 + x2 ([1, 2] -> 3, ..., [10, 9] -> 19); val = train."""
    x = torch.tensor([[1.0, 2.0], [2.0, 1.0], [3.0, 4.0], [4.0, 3.0], [5.0, 6.0], [6.0, 5.0],
                      [7.0, 8.0], [8.0, 7.0], [9.0, 10.0], [10.0, 9.0]])
    y = x.sum(dim=1, keepdim=True)
    return x, y, x.clone(), y.clone()


@dataclass(frozen=True)
class Task:
    """A registry entry: the loader and its settings' defaults (unknown settings are errors)."""

    load: Callable[..., tuple]
    params: dict[str, Any]


TASKS: dict[str, Task] = {
    "teacher": Task(teacher, {"input_dim": 16, "output_dim": 1, "n_train": 1024, "n_val": 256,
                              "noise": 0.0, "teacher_depth": 3, "teacher_width": 64, "teacher_seed": 0}),
    "spirals": Task(spirals, {"n_train": 1024, "n_val": 256, "noise": 0.1, "turns": 1.5}),
    "digits": Task(digits, {"n_val": 297, "split_seed": 0}),
    "blog": Task(blog, {}),
}


def _factory(name: str) -> Callable[..., tuple]:
    return factories.load(name, "task")


def resolve_params(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """A task's full settings: defaults overlaid with the spec's; unknown ones are errors."""
    if ":" in name:
        _factory(name)  # fail at parse time, not in a worker
        return {key: _factory_value(key, value, value) for key, value in given.items()}
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {sorted(TASKS)} or 'pkg.module:function'")
    defaults = TASKS[name].params
    for key, value in given.items():
        if key not in defaults:
            raise UserError(f"unknown key [task] {key!r} for task {name!r}; choose from {sorted(defaults)}")
        want = type(defaults[key])
        ok = is_number(value) if want is float else isinstance(value, want) and not isinstance(value, bool)
        minimum = 1 if want is int and not key.endswith("seed") else 0
        if not ok or value < minimum:
            kind = "an integer" if want is int else "a finite number"
            raise UserError(f"[task] {key} = {value!r}: expected {kind} >= {minimum}")
    return {**defaults, **{k: float(v) if type(defaults[k]) is float else v for k, v in given.items()}}


def _factory_value(key: str, value: Any, whole: Any) -> Any:
    # A user factory's settings go into the job id (JSON) and the bundle key (hashed): allow
    # strings, booleans, numbers and lists of them (as tuples), not TOML dates or tables.
    if isinstance(value, (list, tuple)):
        return tuple(_factory_value(key, v, whole) for v in value)
    if isinstance(value, (str, bool)) or is_number(value):
        return value
    raise UserError(f"[task] {key} = {whole!r}: a task factory's settings must be strings, booleans, "
                    "finite numbers or lists of them")


@functools.lru_cache(maxsize=64)
def _load_cached(name: str, params: tuple, seed: int) -> TaskData:
    loader = _factory(name) if ":" in name else TASKS[name].load
    out = loader(seed=seed, **dict(params))
    return _check(name, out)


def load(name: str, params: tuple[tuple[str, Any], ...], seed: int) -> TaskData:
    """Load a task's data for one job seed (cached per process)."""
    return _load_cached(name, params, seed)


def _check(name: str, out: Any) -> TaskData:
    if not isinstance(out, (tuple, list)) or len(out) != 4 or not all(torch.is_tensor(t) for t in out):
        raise TaskError(f"task {name!r} must return 4 tensors (x_train, y_train, x_val, y_val)")
    x_tr, y_tr, x_va, y_va = (t.detach().cpu() for t in out)
    x_tr, x_va = x_tr.float().flatten(1), x_va.float().flatten(1)
    if len(x_tr) != len(y_tr) or len(x_va) != len(y_va) or len(x_tr) == 0 or len(x_va) == 0:
        raise TaskError(f"task {name!r}: x and y lengths differ or a split is empty "
                        f"({len(x_tr)}/{len(y_tr)} train, {len(x_va)}/{len(y_va)} val)")
    if not (torch.isfinite(x_tr).all() and torch.isfinite(x_va).all()):
        raise TaskError(f"task {name!r}: inputs contain NaN or inf")
    if y_tr.dtype.is_floating_point:
        y_tr, y_va = y_tr.float().reshape(len(y_tr), -1), y_va.float().reshape(len(y_va), -1)
        if not (torch.isfinite(y_tr).all() and torch.isfinite(y_va).all()):
            raise TaskError(f"task {name!r}: targets contain NaN or inf")
        return TaskData(x_tr, y_tr, x_va, y_va, None)
    y_tr, y_va = y_tr.long().reshape(-1), y_va.long().reshape(-1)
    if y_tr.min() < 0 or y_va.min() < 0:
        raise TaskError(f"task {name!r}: class labels must be >= 0")
    classes = int(max(y_tr.max(), y_va.max())) + 1
    return TaskData(x_tr, y_tr, x_va, y_va, classes)


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
