"""What a spec may name, declared without torch: activations, architectures and the settings each
takes, tasks and their settings.

The spec (:mod:`bench.spec`) checks names and settings against these declarations, so reading
and checking a spec (and ``--dry-run``) does not import torch. The torch registries are keyed by
exactly these names (``activations.ACTIVATIONS``, ``models.ARCHS`` with
``architectures.ARCHITECTURES``, ``tasks.TASKS``); tests/test_layers.py asserts the key sets and
each built-in factory's signature match, so they cannot drift. Init schemes are declared in
:mod:`bench.train.schemes`.

A user's factory (``"pkg.module:fn"``, for an arch or a task) is imported to read its signature:
if its module imports torch, so does checking the spec; the call needs it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bench import factories
from bench.errors import UserError, is_number, shown

# --- activations ---------------------------------------------------------------------------------
ACTIVATIONS = ("relu", "tanh", "gelu", "leaky_relu", "selu", "sigmoid", "linear")

# --- architectures -------------------------------------------------------------------------------
REQUIRED = inspect.Parameter.empty  # a setting without a default: the spec (or its defaults) must give it
# Each built-in architecture's factory settings, in its signature's order, with their defaults (the
# factory is fn(in_shape, out_dim, **settings)). The MLP (trained by the stacked engine) takes none but
# depth, width and activation, which every spec has.
ARCHS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "cnn": {"depth": REQUIRED, "width": REQUIRED, "activation": "relu", "norm": "none"},
    "resmlp": {"depth": REQUIRED, "width": REQUIRED, "activation": "relu", "norm": "none", "gates": False,
               "scalar_biases": False},
    "resnet": {"depth": REQUIRED, "width": REQUIRED, "activation": "relu", "norm": "batch", "gates": False,
               "scalar_biases": False},
    "transformer": {"depth": REQUIRED, "width": REQUIRED, "heads": 4, "pre_norm": True, "tied": False,
                    "activation": "gelu", "gates": False},
}
# Settings every architecture may take from [model] (passed when its factory accepts them).
COMMON = ("depth", "width", "activation")


def arch_names() -> list[str]:
    """Every built-in architecture's name."""
    return sorted(ARCHS)


def layer_dims(d_in: int, d_out: int, depth: int, width: int) -> list[int]:
    """Widths of an MLP with ``depth`` linear layers: [d_in, width x (depth - 1), d_out]."""
    return [d_in, *([width] * (depth - 1)), d_out]


@dataclass(frozen=True)
class _Signature:
    accepted: list[str]  # keyword settings, in order
    required: list[str]  # accepted ones without a default
    takes_any: bool  # **kwargs
    takes_shape: bool  # accepts in_shape= and out_dim=


def _signature(arch: str) -> _Signature | None:
    if arch in ARCHS and arch != "mlp":
        settings = ARCHS[arch]
        return _Signature(list(settings), [n for n, d in settings.items() if d is REQUIRED], False, True)
    if not factories.is_factory(arch):
        raise UserError(f"arch = {arch!r}: unknown; choose from {arch_names()} or 'pkg.module:function'")
    try:
        params = inspect.signature(factories.load(arch, "[model] arch")).parameters
    except (TypeError, ValueError):
        return None
    keyword = [n for n, p in params.items() if n not in ("in_shape", "out_dim")
               and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return _Signature(keyword, [n for n in keyword if params[n].default is params[n].empty], takes_any,
                      takes_any or {"in_shape", "out_dim"} <= set(params))


def factory_settings(arch: str, given: dict[str, Any], own: Iterable[str]) -> dict[str, Any]:
    """The keyword arguments a non-MLP factory gets: ``given`` (depth, width, activation and the model's
    own settings), checked against its declared settings (a built-in) or its signature (a user's).

    ``own`` names the settings the spec gave as the model's own ([model] keys or ``model.<name>``
    axes): each must be accepted. The common ones (``COMMON``) are passed when accepted.

    Raises:
        UserError: an own setting the factory does not take, or a required keyword it is not given;
            one line naming the setting and what the factory accepts.
    """
    sig = _signature(arch)
    if sig is None:
        return dict(given)
    for name in own:
        if name not in sig.accepted and not sig.takes_any:
            raise UserError(f"[model] {name}: {arch} does not take a setting {name!r}; "
                            f"it accepts {sig.accepted}")
    if not sig.takes_shape:
        params = list(inspect.signature(factories.load(arch, "[model] arch")).parameters)
        raise UserError(f"arch = {arch!r}: a model factory is called as fn(in_shape=..., out_dim=..., "
                        f"**settings); this one accepts {params}")
    kwargs = {k: v for k, v in given.items() if k in sig.accepted or sig.takes_any or k not in COMMON}
    missing = [n for n in sig.required if n not in kwargs]
    if missing:
        raise UserError(f"[model] {missing[0]}: {arch} needs a setting {missing[0]!r} (give it in [model] "
                        f"or as a 'model.{missing[0]}' axis); it accepts {sig.accepted}")
    return kwargs


# --- tasks ---------------------------------------------------------------------------------------
def check_markov(*, vocab: int, order: int, seq_len: int, concentration: float, **_: object) -> None:
    """The markov task's settings, or a UserError naming the bad one."""
    if seq_len < order:
        raise UserError(f"[task] seq_len = {seq_len} for task 'markov' must be >= order = {order}")
    if order not in (1, 2):
        raise UserError(f"[task] order = {order!r} for task 'markov': choose from [1, 2]")
    if vocab < 2:
        raise UserError(f"[task] vocab = {vocab!r} for task 'markov': expected an integer >= 2")
    if not concentration > 0:
        raise UserError(f"[task] concentration = {concentration!r} for task 'markov': must be > 0")


@dataclass(frozen=True)
class Task:
    """A task's settings and their defaults (unknown settings are errors).

    ``added``: settings added after job ids were published. At their default they are left out
    of the resolved settings (so out of job ids and bundle keys): every id made before stays valid,
    and the loader's own keyword default applies.
    """

    params: dict[str, Any]
    added: dict[str, Any] = field(default_factory=dict)
    check: Callable[..., Any] | None = None  # called with the resolved settings; raises UserError


TASKS: dict[str, Task] = {
    "teacher": Task({"input_dim": 16, "output_dim": 1, "n_train": 1024, "n_val": 256, "noise": 0.0,
                     "teacher_depth": 3, "teacher_width": 64, "teacher_seed": 0}),
    "spirals": Task({"n_train": 1024, "n_val": 256, "noise": 0.1, "turns": 1.5}),
    "digits": Task({"n_val": 297, "split_seed": 0}, added={"images": False}),
    "blog": Task({}),
    "markov": Task({"vocab": 16, "order": 1, "seq_len": 32, "chain_seed": 0, "n_train": 1024, "n_val": 256,
                    "concentration": 0.3}, check=check_markov),
}


def resolve_task_params(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """A task's full settings: defaults overlaid with the spec's; unknown ones are errors."""
    if ":" in name:
        factories.load(name, "task")  # fail at parse time, not in a worker
        return {key: _factory_value(key, value, value) for key, value in given.items()}
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {sorted(TASKS)} or 'pkg.module:function'")
    task = TASKS[name]
    defaults = {**task.params, **task.added}
    for key, value in given.items():
        if key not in defaults:
            raise UserError(f"unknown key [task] {key!r} for task {name!r}; choose from {sorted(defaults)}")
        want = type(defaults[key])
        if want is bool:
            if not isinstance(value, bool):
                raise UserError(f"[task] {key} = {shown(value)}: expected true or false")
            continue
        ok = is_number(value) if want is float else isinstance(value, want) and not isinstance(value, bool)
        minimum = 1 if want is int and not key.endswith("seed") else 0
        if not ok or value < minimum:
            kind = "an integer" if want is int else "a finite number"
            raise UserError(f"[task] {key} = {shown(value)}: expected {kind} >= {minimum}")
    given = {k: v for k, v in given.items() if not (k in task.added and v == task.added[k])}
    resolved = {**task.params, **{k: float(v) if type(defaults[k]) is float else v for k, v in given.items()}}
    if task.check is not None:
        task.check(**resolved)  # settings only the task can judge, judged now rather than in a worker
    return resolved


def _factory_value(key: str, value: Any, whole: Any) -> Any:
    # A user factory's settings go into the job id (JSON) and the bundle key (hashed): allow
    # strings, booleans, numbers and lists of them (as tuples), not TOML dates or tables.
    if isinstance(value, (list, tuple)):
        return tuple(_factory_value(key, v, whole) for v in value)
    if isinstance(value, (str, bool)) or is_number(value):
        return value
    raise UserError(f"[task] {key} = {whole!r}: a task factory's settings must be strings, booleans, "
                    "finite numbers or lists of them")
