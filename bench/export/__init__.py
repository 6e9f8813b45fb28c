"""Export a sweep's results to the tools people already browse runs in: TensorBoard and MLflow.

``export(DIR, "tensorboard", OUT)`` and ``export(DIR, "mlflow", URI)`` read the store
through the public results API (:func:`bench.load`) and write one run per job. Each
target lives in its own module and imports its package (an optional extra:
``initbench[tensorboard]``, ``initbench[mlflow]``) only when it runs, so importing
initbench never imports TensorBoard or MLflow.

This module holds what both targets share: the registry of targets, how a job's
row splits into settings and metrics, and how a run is named after its settings.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import UserError

__all__ = ["TARGETS", "Target", "export", "settings_of", "metrics_of", "run_names", "plain"]


@dataclass(frozen=True)
class Target:
    """An export target: the module whose ``write(results, dest, **options)`` does it, and its extra."""

    module: str
    package: str  # the top-level package the extra installs (imported only by ``module``)
    extra: str
    default_dest: str  # where it writes without a DEST, relative to the sweep directory
    options: tuple[str, ...] = ()  # the command-line options that apply to this target


TARGETS: dict[str, Target] = {
    "tensorboard": Target("bench.export.tensorboard", "tensorboard", "tensorboard", "tensorboard",
                          options=("layers",)),
    "mlflow": Target("bench.export.mlflow", "mlflow", "mlflow", "mlflow.db", options=("experiment",)),
}

# Columns of .runs that are neither settings nor metrics.
BOOKKEEPING = ("job_id", "status", "error", "pathologies", "wall_s", "device", "host", "torch_version",
               "python", "initbench")


def target(name: str) -> Target:
    """The target called ``name``; an unknown name is a UserError listing the valid ones."""
    if name not in TARGETS:
        raise UserError(f"--to {name!r}: unknown export target; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def require(name: str) -> None:
    """Fail with one line naming the extra to install when the target's package is missing."""
    spec = target(name)
    try:
        importlib.import_module(spec.package)
    except ImportError:
        raise UserError(f"--to {name} needs the optional package {spec.package!r}: "
                        f"pip install 'initbench[{spec.extra}]'") from None


def export(directory: str | Path, to: str, dest: str | None = None, **options: Any):
    """Export the sweep stored in ``directory`` to ``to`` (``tensorboard`` or ``mlflow``).

    Args:
        directory: a sweep's output directory (holding its ``store.sqlite``).
        to: the target's name, a key of :data:`TARGETS`.
        dest: the TensorBoard log directory, or the MLflow tracking URI (or SQLite file);
            default ``DIR/tensorboard`` or ``DIR/mlflow.db``.
        **options: the target's own options (``layers`` for TensorBoard, ``experiment`` for MLflow).

    Returns:
        The target's report of what it wrote (``Written``), whose ``str`` is one line.

    Raises:
        UserError: unknown target or option, the extra not installed, no store in ``directory``.
    """
    spec = target(to)
    unknown = sorted(k for k, v in options.items() if v not in (None, False) and k not in spec.options)
    if unknown:
        raise UserError(f"--{unknown[0]} does not apply to --to {to} (its options: "
                        f"{', '.join('--' + o for o in spec.options) or 'none'})")
    require(to)
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory; pass a sweep's output directory "
                        "(the --out of bench.sweep)")
    from bench.store import load

    results = load(directory)
    module = importlib.import_module(spec.module)
    return module.write(results, dest if dest is not None else str(directory / spec.default_dest),
                        **{k: v for k, v in options.items() if k in spec.options})


def metrics_of(runs) -> list[str]:
    """The metric columns of a runs table that hold a number for at least one job, in table order."""
    from bench.metrics import INTERNAL, METRICS

    known = set(METRICS) | set(INTERNAL)
    return [c for c in runs.columns if c in known and runs[c].notna().any()]


def settings_of(runs) -> list[str]:
    """The setting columns of a runs table (every column that is neither a metric nor bookkeeping)."""
    from bench.metrics import INTERNAL, METRICS

    skip = set(METRICS) | set(INTERNAL) | set(BOOKKEEPING)
    return [c for c in runs.columns if c not in skip]


def axis_column(axis: str) -> str:
    """The runs column of a grid axis: ``init_params.<scheme>.<name>`` is stored as ``init.<name>``."""
    if axis.startswith("init_params."):
        return "init." + axis.rsplit(".", 1)[-1]
    return axis


def plain(value: Any) -> Any:
    """A setting or metric as a plain Python value: None for missing, str for tuples and lists."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(str(plain(v)) for v in value) + ")"
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _text(value: Any) -> str:
    value = plain(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_names(results, *, seed: bool = True) -> dict[str, str]:
    """A readable, unique name per job from its axis values, e.g. ``init=zeros,depth=8,lr=0.03,seed=1``.

    Args:
        results: loaded results (``bench.load``).
        seed: include the seed axis (False names the job's group of seeds instead).

    Returns:
        job_id -> name. Names hold no path separator; jobs whose axis values coincide (or a
        sweep without axes) get their job_id appended, so names stay unique.
    """
    runs = results.runs
    axes = [(a, axis_column(a)) for a in results.axes if seed or a != "seed"]
    axes = [(a, c) for a, c in axes if c in runs]
    names: dict[str, str] = {}
    for row in runs.to_dict("records"):
        parts = [f"{a.split('.')[-1] if a.startswith('init_params.') else a}={_text(row[c])}"
                 for a, c in axes if plain(row[c]) is not None]
        name = ",".join(parts).replace("/", "_").replace("\\", "_")
        names[row["job_id"]] = name[:200]
    if seed:
        counts: dict[str, int] = {}
        for name in names.values():
            counts[name] = counts.get(name, 0) + 1
        names = {jid: name if name and counts[name] == 1 else f"{name},job={jid}".lstrip(",")
                 for jid, name in names.items()}
    return names
