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

from bench.schema import hashed


@dataclass(frozen=True)
class Rule:
    """One init rule: the parameters whose dotted names match a glob get one action.

    Exactly one of ``init`` (a per-tensor scheme, with ``params``), ``scale`` (multiply) or
    ``value`` (fill a constant). Rules run after the job's scheme, in order; a later one sees
    what an earlier one did.
    """

    match: str  # fnmatch glob over dotted names: "head.weight", "blocks.*.mlp.fc2.weight"
    init: str | None = None
    params: tuple[tuple[str, Any], ...] = ()
    scale: float | None = None
    value: float | None = None

    def describe(self) -> str:
        """The rule as its TOML reads, for messages."""
        action = (f"init = {self.init!r}" + "".join(f", {k} = {v!r}" for k, v in self.params)
                  if self.init else f"scale = {self.scale!r}" if self.scale is not None
                  else f"value = {self.value!r}")
        return f"{{match = {self.match!r}, {action}}}"

    def as_dict(self) -> dict[str, Any]:
        """A canonical, JSON-ready form (what a job id hashes)."""
        out: dict[str, Any] = {"match": self.match}
        if self.init:
            out.update(init=self.init, **dict(self.params))
        else:
            out["scale" if self.scale is not None else "value"] = (
                self.scale if self.scale is not None else self.value)
        return out


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
    # An architecture's own settings beyond depth, width and activation ([model] keys, or "model.<name>"
    # axes), passed to its factory: ``norm``, ``heads``, a user factory's ``channels``, ...
    model_params: tuple[tuple[str, Any], ...] = ()
    rules: str = "none"  # the name of its init rule set
    init_rules: tuple[Rule, ...] = ()  # that set, resolved: what the job id hashes

    @property
    def job_id(self) -> str:
        """Stable id: the hash of the canonical settings (same settings, same id, anywhere).

        ``rules = "none"`` is left out (bench.schema.hashed), so ids from before rules existed hold.
        """
        blob = json.dumps(hashed(self.settings()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def settings(self) -> dict[str, Any]:
        """Flat settings: scheme parameters as ``init.<name>``, task ones as ``task.<name>``.

        A rule set's resolved rules are one JSON string, ``init_rules``, so editing a rule changes the id.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in ("init_params", "task_params", "init_rules", "model_params"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update({f"init.{k}": v for k, v in self.init_params})
        out.update({f"task.{k}": v for k, v in self.task_params})
        out.update({f"model.{k}": v for k, v in self.model_params})
        if self.init_rules:
            out["init_rules"] = json.dumps([r.as_dict() for r in self.init_rules], separators=(",", ":"))
        return out

    def shape_key(self) -> tuple:
        """What jobs must share to be trained together as one stacked bundle."""
        return (self.arch, self.depth, self.width, self.activation, self.model_params, self.task,
                self.task_params, self.optimizer, self.steps, self.batch_size, self.log_every)


# Every setting a job has (its fields but the scheme's and task's own parameters, which are
# ``init.<name>`` and ``task.<name>`` in ``Job.settings()``): what readers of results take as settings.
SETTING_NAMES = tuple(f.name for f in fields(Job)
                      if f.name not in ("init_params", "task_params", "init_rules", "model_params"))
