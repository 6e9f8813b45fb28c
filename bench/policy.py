"""The regression policy: which metrics ``bench.regress`` watches, in which direction, with which tolerance.

Torch- and scipy-free, so a spec's ``[regression]`` table is validated at the spec boundary
(``bench.spec``) and stored with the sweep without importing the statistics (:mod:`bench.verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from bench.errors import UserError, shown

ALPHA = 0.01  # false-discovery level; measured whole-sweep false-alarm rate 1-2% (docs/ci.md)


@dataclass(frozen=True)
class Tolerance:
    """How far a median may move before it counts: relative (``"10%"``) or absolute (``0.01``)."""

    value: float
    relative: bool

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"

    def change(self, current: float, baseline: float) -> float:
        """Signed change from baseline to current: a fraction of the baseline, or a difference."""
        if current == baseline:
            return 0.0
        if not self.relative:
            return current - baseline
        return (current - baseline) / abs(baseline) if baseline else math.copysign(math.inf, current)


def parse_tolerance(value: Any, where: str) -> Tolerance:
    """``"10%"`` -> relative 0.1; ``0.01`` or ``"0.01"`` -> absolute; anything else is a UserError."""
    text = str(value).strip() if not isinstance(value, bool) else ""
    relative = text.endswith("%")
    try:
        number = float(text[:-1] if relative else text)
    except ValueError:
        number = math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not math.isfinite(number) \
            or number < 0:
        raise UserError(f"{where} = {shown(value)}: expected a tolerance >= 0, a percentage like '10%' "
                        "(relative to the baseline) or a number like 0.01 (absolute)")
    return Tolerance(number / 100 if relative else number, relative)


@dataclass(frozen=True)
class Metric:
    """A watched quantity: which way is worse, its scale, its default tolerance."""

    name: str
    direction: str  # "lower" (lower is better), "higher", or "changed" (any move is suspect)
    log: bool  # tested on a log scale (positive, multiplicative quantities)
    tolerance: Tolerance
    doc: str
    step: str | float | None = None  # values come in steps of this (a number, or the setting that says)

    def worse(self, change: float) -> bool:
        return change > 0 if self.direction == "lower" else change < 0

    def size(self, change: float, tolerance: Tolerance) -> float:
        """How large a change is against a tolerance; symmetric on the log scale for ``changed``."""
        if self.direction == "changed" and self.log and tolerance.relative and change < 0:
            return 1 / (1 + change) - 1 if change > -1 else math.inf  # x0.5 is as large as x2
        return abs(change)


def _m(name: str, direction: str, log: bool, tol: str | float, doc: str,
       step: str | float | None = None) -> Metric:
    return Metric(name, direction, log, parse_tolerance(tol, name), doc, step)


SUCCESS = "success_rate"
METRICS: dict[str, Metric] = {m.name: m for m in (
    _m(SUCCESS, "higher", False, 0.25, "share of seeds that reached the target and did not diverge"),
    _m("steps_to_target", "lower", True, "10%", "steps to the target, over the seeds that reached it",
       step="log_every"),
    _m("final_loss", "lower", True, "10%", "last logged train loss (diverged seeds left out)"),
    _m("final_val_loss", "lower", True, "10%", "last validation loss (diverged seeds left out)"),
    _m("final_val_acc", "higher", False, 0.02, "last validation accuracy (classification)"),
    _m("best_loss", "lower", True, "10%", "lowest logged train loss"),
    _m("loss_auc", "lower", True, "10%", "area under the normalised train-loss curve"),
    _m("n_spikes", "lower", False, 1.0, "loss spikes", step=1.0),
    _m("act_ratio_init", "changed", True, "25%", "last over first hidden activation variance at step 0"),
    _m("grad_ratio_init", "changed", True, "25%", "first over last layer gradient norm at step 0"),
    _m("dead_frac_init", "changed", False, 0.05, "share of dead hidden units at step 0"),
    _m("dead_frac_final", "lower", False, 0.05, "share of dead hidden units at the end"),
    _m("weight_growth", "changed", True, "25%", "weight norm at the end over step 0"),
)}
DEFAULT_METRICS = (SUCCESS, "steps_to_target", "final_loss", "final_val_loss", "dead_frac_init",
                   "act_ratio_init")
STORED = tuple(m for m in METRICS if m != SUCCESS)  # per-seed values a baseline keeps


def metric_named(name: Any, where: str) -> Metric:
    if not isinstance(name, str) or name not in METRICS:
        raise UserError(f"{where}: unknown metric {name!r}; choose from {list(METRICS)}")
    return METRICS[name]


@dataclass(frozen=True)
class Policy:
    """What a check watches and how strictly: metrics, tolerance overrides, alpha."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    tolerances: tuple[tuple[str, Tolerance], ...] = ()
    alpha: float = ALPHA

    def tolerance(self, metric: str) -> Tolerance:
        return dict(self.tolerances).get(metric, METRICS[metric].tolerance)

    def with_tolerances(self, pairs: Iterable[tuple[str, Tolerance]]) -> Policy:
        """A tolerance also watches its metric (``--fail steps_to_target:5%`` adds it if needed)."""
        tols = dict(self.tolerances)
        tols.update(pairs)
        metrics = self.metrics + tuple(m for m in tols if m not in self.metrics)
        return replace(self, metrics=metrics, tolerances=tuple(sorted(tols.items())))

    def describe(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "metrics": list(self.metrics),
                "tolerances": {m: str(self.tolerance(m)) for m in self.metrics}}


TABLE_KEYS = ("metrics", "tolerance", "alpha")


def parse_table(table: Mapping[str, Any], where: str = "[regression]") -> Policy:
    """Validate a spec's ``[regression]`` table into a :class:`Policy`.

    Keys: ``metrics`` (list of metric names; default :data:`DEFAULT_METRICS`),
    ``tolerance`` (table metric -> ``"10%"`` or a number; a tolerance also watches
    its metric), ``alpha`` (false-discovery level in (0, 1), default :data:`ALPHA`).

    Raises:
        UserError: naming the key, the value and the valid choices.
    """
    for key in table:
        if key not in TABLE_KEYS:
            raise UserError(f"{where}: unknown key {key!r}; choose from {list(TABLE_KEYS)}")
    policy = Policy()
    if "metrics" in table:
        names = table["metrics"]
        if not isinstance(names, list) or not names:
            raise UserError(f"{where} metrics = {names!r}: expected a non-empty list of metric names")
        policy = replace(policy, metrics=tuple(dict.fromkeys(metric_named(n, f"{where} metrics").name
                                                             for n in names)))
    if "alpha" in table:
        alpha = table["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise UserError(f"{where} alpha = {alpha!r}: expected a number between 0 and 1, e.g. 0.01")
        policy = replace(policy, alpha=float(alpha))
    tols = table.get("tolerance", {})
    if not isinstance(tols, Mapping):
        raise UserError(f"{where} tolerance = {tols!r}: expected a table like "
                        "{{steps_to_target = \"10%\", final_loss = 0.01}}")
    return policy.with_tolerances((metric_named(k, f"{where} tolerance").name,
                                   parse_tolerance(v, f"{where} tolerance.{k}")) for k, v in tols.items())
