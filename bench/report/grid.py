"""The shape of a sweep as the report sees it: schemes, their colours, axes, facets and cells.

Every figure and table asks this module the same questions (which axis goes on
the heatmap's rows, which extra axes must be faceted or fixed, which colour a
scheme has), so they all answer them the same way.

Conventions used throughout the report:

- a *scheme* is the init name, plus any ``init_params.<scheme>.<param>`` grid
  axis value (``scaled_normal (std=0.1)``); it is the unit every figure compares;
- a *cell* is one combination of all varying settings except seed and scheme;
- ``steps`` is ``steps_to_target`` with "never reached" as +inf (failed jobs: NaN),
  so that medians over seeds rank "never" last instead of dropping it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns

from bench.schema import axis_column
from bench.settings import MetricsConfig, metrics_from

# Fixed scheme -> colour slot in seaborn's 'colorblind' palette, so that a scheme has the
# same colour in every figure and in every report. Grey (7) and yellow (8) go to the
# schemes least likely to be plotted: grey reads as "missing", yellow is faint on white.
PALETTE = sns.color_palette("colorblind", 10).as_hex()
_SLOTS = {"default": 0, "kaiming_normal": 1, "xavier_uniform": 2, "zeros": 3, "scaled_normal": 4,
          "kaiming_uniform": 5, "xavier_normal": 6, "orthogonal": 9, "mean_field": 8, "lsuv": 7}
PREFERRED = ("depth", "lr")  # heatmap rows, then columns, when the grid has them
LABELS = {"depth": "depth (linear layers)", "lr": "learning rate", "width": "width (units per layer)",
          "batch_size": "batch size (samples)", "steps": "training steps", "momentum": "momentum",
          "weight_decay": "weight decay", "seed": "seed"}


def scheme_colors(schemes: list[str]) -> dict[str, str]:
    """One colour per scheme: known init names keep a fixed slot, others take free ones in order."""
    colors = {s: PALETTE[_SLOTS[s]] for s in schemes if s in _SLOTS}
    free = [c for c in PALETTE if c not in colors.values()] or PALETTE
    for i, s in enumerate(s for s in schemes if s not in colors):
        colors[s] = free[i % len(free)]
    return colors


def fmt(value: Any) -> str:
    """A setting value as short text (0.003, 16, relu, (0.9, 0.999))."""
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(fmt(v) for v in value) + ")"
    return str(value)


def label(axis: str) -> str:
    """An axis name with its unit, for figure labels."""
    return LABELS.get(axis, axis)


def _hashable(series: pd.Series) -> pd.Series:
    # betas are tuples; lists (or other unhashables) would break groupby
    if series.dtype == object:
        return series.map(lambda v: tuple(v) if isinstance(v, list) else v)
    return series


@dataclass
class Grid:
    """A sweep's runs, prepared for the report, and the choices every figure shares."""

    runs: pd.DataFrame  # bench.load(...).runs plus 'scheme' and 'steps'
    schemes: list[str]  # in a stable order: spec order of init, then parameter value
    colors: dict[str, str]
    axes: list[str]  # varying settings (run columns) other than seed and the scheme
    values: dict[str, list[Any]]  # each axis' values, in display order
    y_axis: str | None  # heatmap rows (depth if it varies)
    x_axis: str | None  # heatmap columns (lr if it varies)
    extras: list[str]  # the other varying axes: faceted, or fixed at a reference value
    reference: dict[str, Any]  # the most common value of each extra axis
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    has_seeds: bool = False
    scheme_params: list[str] = field(default_factory=list)  # init.<param> axes folded into 'scheme'

    @property
    def cell_cols(self) -> list[str]:
        return list(self.axes)

    def facets(self, limit: int) -> tuple[list[tuple[str, pd.Series]], str]:
        """(label, row mask) per combination of extra-axis values, and a note for the caption.

        With more than ``limit`` combinations only the reference one is shown (never an
        average over them); the note says so.
        """
        runs = self.runs
        if not self.extras:
            return [("", pd.Series(True, index=runs.index))], ""
        combos = runs[self.extras].drop_duplicates()
        combos = combos.sort_values(self.extras, key=lambda s: s.map(self._rank(s.name))).itertuples(
            index=False, name=None)
        combos = list(combos)
        if len(combos) > limit:
            note = (f"Showing only {self.describe(self.reference)} (the most common value"
                    f"{'s' if len(self.extras) > 1 else ''}, the first in spec order on ties); the other "
                    f"{len(combos) - 1} combinations of {', '.join(self.extras)} are in runs.csv.")
            combos = [tuple(self.reference[a] for a in self.extras)]
        else:
            note = f"One row per value of {', '.join(self.extras)}."
        out = []
        for combo in combos:
            values = dict(zip(self.extras, combo, strict=True))
            out.append((self.describe(values), match(runs, values)))
        return out, note

    def reference_mask(self) -> tuple[pd.Series, str]:
        """Rows at the reference value of every extra axis, and a sentence saying which."""
        mask = match(self.runs, self.reference)
        note = (f" Other axes fixed at {self.describe(self.reference)} (the most common values, the first in "
                "spec order on ties)." if self.reference else "")
        return mask, note

    def along(self, axis: str) -> tuple[pd.Series, str]:
        """Rows that vary only along ``axis`` (and seed, scheme): every other axis at its reference
        value (extras) or its most common value (the heatmap axes), and a sentence saying which."""
        usable = self.runs[self.runs["status"] != "failed"]
        usable = self.runs if usable.empty else usable
        fixed = {a: self.reference[a] if a in self.reference else _mode(usable[a], self.values[a])
                 for a in self.axes if a != axis}
        note = (f" Other axes fixed at {self.describe(fixed)} (the most common values, the first in spec "
                "order on ties)." if fixed else "")
        return match(self.runs, fixed), note

    @staticmethod
    def describe(values: dict[str, Any]) -> str:
        return ", ".join(f"{k}={fmt(v)}" for k, v in values.items())

    def _rank(self, axis: str):
        order = {v: i for i, v in enumerate(self.values.get(axis, []))}
        return lambda v: order.get(v, len(order))


def match(frame: pd.DataFrame, values: dict[str, Any]) -> pd.Series:
    """Rows whose settings equal ``values`` (tuple values such as betas compare as one value)."""
    mask = pd.Series(True, index=frame.index)
    for axis, value in values.items():
        column = frame[axis]
        mask &= column.map(lambda v, want=value: v == want).astype(bool) if isinstance(value, tuple) \
            else column == value
    return mask


def prepare(runs: pd.DataFrame, meta: dict[str, Any]) -> Grid:
    """Derive the report's view of a sweep from its runs table and stored metadata."""
    runs = runs.copy()
    spec = _spec_tables(meta.get("spec_text", ""))
    grid_order: dict[str, list[Any]] = {axis_column(k): list(v) for k, v in spec.get("grid", {}).items()
                                        if isinstance(v, list)}
    for col in runs.columns:
        runs[col] = _hashable(runs[col])
    if "init" not in runs:
        runs["init"] = "?"
    if "status" not in runs:
        runs["status"] = "failed"
    for metric in ("steps_to_target", "final_loss", "best_loss", "initial_loss", "diverged_at"):
        if metric not in runs:
            runs[metric] = np.nan
        runs[metric] = pd.to_numeric(runs[metric], errors="coerce")
    runs["steps"] = runs["steps_to_target"].where(runs["steps_to_target"].notna(), np.inf)
    runs.loc[runs["status"] == "failed", "steps"] = np.nan

    axes_meta = list(dict.fromkeys(axis_column(a) for a in meta.get("axes", [])))
    param_cols = [a for a in axes_meta if a.startswith("init.")]
    param_cols = [c for c in dict.fromkeys(param_cols) if c in runs and runs[c].nunique() > 1]
    runs["scheme"] = runs["init"].astype(str)
    for col in param_cols:
        has = runs[col].notna()
        suffix = " (" + col[5:] + "=" + runs.loc[has, col].map(fmt) + ")"
        runs.loc[has, "scheme"] = runs.loc[has, "scheme"] + suffix
    init_order = {v: i for i, v in enumerate(grid_order.get("init", []))}
    firsts = runs.drop_duplicates("scheme")
    schemes = sorted(firsts["scheme"], key=lambda s: (init_order.get(s.split(" (")[0], len(init_order)), s))

    candidates = [a for a in axes_meta if a in runs and a not in ("seed", "init") and a not in param_cols]
    axes = [a for a in candidates if runs[a].nunique(dropna=False) > 1]
    values = {a: _ordered(runs[a], grid_order.get(a)) for a in axes}
    ordered = [a for a in PREFERRED if a in axes] + [a for a in axes if a not in PREFERRED]
    y_axis = ordered[0] if ordered else None
    x_axis = ordered[1] if len(ordered) > 1 else None
    extras = [a for a in axes if a not in (y_axis, x_axis)]
    usable = runs[runs["status"] != "failed"]
    if usable.empty:
        usable = runs
    reference = {a: _mode(usable[a], values[a]) for a in extras}
    seeds = runs["seed"].nunique() if "seed" in runs else 1
    return Grid(runs=runs, schemes=schemes, colors=scheme_colors(schemes), axes=axes, values=values,
                y_axis=y_axis, x_axis=x_axis, extras=extras, reference=reference,
                metrics=_metrics_config(meta, spec), has_seeds=seeds > 1,
                scheme_params=param_cols)


def _spec_tables(text: str) -> dict[str, Any]:
    # The stored spec was validated when the sweep ran; reading it with tomllib (not
    # bench.spec.parse) keeps the report working where a user's task factory can't be imported.
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return {}


def _metrics_config(meta: dict[str, Any], spec: dict[str, Any]) -> MetricsConfig:
    """The thresholds the sweep validated and stored; a store from before that: its spec's table."""
    if isinstance(meta.get("metrics"), dict):
        return metrics_from(meta["metrics"])
    try:
        return metrics_from(spec.get("metrics", {}))
    except TypeError:
        return MetricsConfig()


def _ordered(series: pd.Series, spec_order: list[Any] | None) -> list[Any]:
    present = list(dict.fromkeys(series.tolist()))
    if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in present):
        return sorted(present)
    if spec_order:
        rank = {fmt(v): i for i, v in enumerate(spec_order)}
        return sorted(present, key=lambda v: rank.get(fmt(v), len(rank)))
    return present


def _mode(series: pd.Series, order: list[Any]) -> Any:
    counts = series.value_counts(dropna=False)
    tally = dict(zip(counts.index, counts.to_numpy(), strict=True))  # .get(tuple) would index by level
    return next(v for v in order if tally.get(v, 0) == counts.max())


def cell_medians(grid: Grid, rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group: median steps (inf = never), median final loss, seed counts by status.

    Columns: ``steps``, ``final_loss``, ``n``, ``n_failed``, ``n_diverged``, ``n_reached``.
    """
    usable = rows.assign(
        failed=rows["status"].eq("failed"), diverged=rows["status"].eq("diverged"),
        reached=rows["steps_to_target"].notna())
    grouped = usable.groupby(by, sort=False, dropna=False)
    out = grouped.agg(steps=("steps", "median"), final_loss=("final_loss", "median"),
                      n=("status", "size"), n_failed=("failed", "sum"), n_diverged=("diverged", "sum"),
                      n_reached=("reached", "sum"))
    return out.reset_index()


def quartiles(frame: pd.DataFrame, by: list[str], column: str) -> pd.DataFrame:
    """Per group: ``median`` and the interquartile band ``low`` (25%) to ``high`` (75%) of ``column``."""
    if frame.empty:  # unstack of an empty groupby has no quantile columns to name
        return pd.DataFrame(columns=[*by, "low", "median", "high"])
    q = frame.groupby(by)[column].quantile([0.25, 0.5, 0.75]).unstack()
    q.columns = ["low", "median", "high"]
    return q.reset_index()


def median_ci(values: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
              seed: int = 0) -> tuple[float, float, float]:
    """Median and percentile-bootstrap CI of the median; inf allowed ("never"), NaN dropped."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    median = float(np.median(values))
    if len(values) < 2:
        return median, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = np.sort(values[rng.integers(0, len(values), size=(n_boot, len(values)))], axis=1)
    n = len(values)
    # median of each resample without interpolating between inf values (inf - inf is NaN)
    meds = np.where(n % 2, boots[:, n // 2], _mid(boots[:, (n - 1) // 2], boots[:, n // 2]))
    alpha = (1 - level) / 2
    low, high = np.quantile(meds, [alpha, 1 - alpha], method="inverted_cdf")
    return median, float(low), float(high)


def _mid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(b), b, (a + b) / 2)
