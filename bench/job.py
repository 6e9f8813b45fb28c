"""A job: one fully resolved configuration of a sweep, and its stable id.

Below everything that trains (``bench.train``) and above nothing but the standard library, so
engines, records and the spec parser all share one definition. ``bench.spec`` builds jobs from
TOML; a job's id is a hash of its canonical settings, the same on every machine (resume and
baselines rely on it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Job:
    """One fully resolved configuration: every setting has a value."""

    arch: str
    depth: int
    width: int
    activation: str
    init: str
    init_bias: str | float
    task: str
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    betas: tuple[float, float]
    steps: int
    batch_size: int
    log_every: int
    seed: int
    init_params: tuple[tuple[str, Any], ...] = ()  # the parameters of this job's scheme only
    task_params: tuple[tuple[str, Any], ...] = ()

    @property
    def job_id(self) -> str:
        """Stable id: the hash of the canonical settings (same settings, same id, anywhere)."""
        blob = json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def settings(self) -> dict[str, Any]:
        """Flat settings: scheme parameters as ``init.<name>``, task ones as ``task.<name>``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in ("init_params", "task_params"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update({f"init.{k}": v for k, v in self.init_params})
        out.update({f"task.{k}": v for k, v in self.task_params})
        return out

    def shape_key(self) -> tuple:
        """What jobs must share to be trained together as one stacked bundle."""
        return (self.arch, self.depth, self.width, self.activation, self.task, self.task_params,
                self.optimizer, self.steps, self.batch_size, self.log_every)


# Every setting a job has (its fields but the scheme's and task's own parameters, which are
# ``init.<name>`` and ``task.<name>`` in ``Job.settings()``): what readers of results take as settings.
SETTING_NAMES = tuple(f.name for f in fields(Job) if f.name not in ("init_params", "task_params"))
