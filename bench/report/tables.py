"""The report's tables (pandas, HTML-escaped) and the data files written beside the page."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from bench.metrics import PATHOLOGIES
from bench.report.figures import performance_profile
from bench.report.grid import Grid, cell_medians, fmt, median_ci

DETAIL_ROWS = 60  # flagged groups listed in the page; all of them are in runs.csv


def html(df: pd.DataFrame, **kwargs: Any) -> str:
    """A DataFrame as an escaped HTML table in the page's style."""
    return df.to_html(index=False, escape=True, border=0, classes="data", na_rep="—", **kwargs)


def _steps(value: float) -> str:
    return "never" if np.isinf(value) else ("—" if np.isnan(value) else f"{value:.0f}")


def _num(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{value:.3g}"


# --- header -----------------------------------------------------------------------
def header(grid: Grid, meta: dict[str, Any]) -> dict[str, Any]:
    """Sweep name, job counts and environment, as text for the template (which escapes it)."""
    runs = grid.runs
    env = meta.get("env") or {}

    def distinct(col: str) -> str:
        values = [v for v in runs[col].dropna().astype(str).unique() if v] if col in runs else []
        return ", ".join(values) or str(env.get(col, "") or "unknown")

    counts = runs["status"].value_counts()
    wall = pd.to_numeric(pd.Series([meta.get("wall_s")]), errors="coerce").iloc[0]
    wall = f"{wall:.1f} s" if np.isfinite(wall) else "unknown (still running, or interrupted)"
    try:
        created = dt.datetime.fromtimestamp(float(meta["created"]), dt.UTC)
        created = created.strftime("%Y-%m-%d %H:%M UTC")
    except (KeyError, ValueError, OverflowError, OSError):
        created = "unknown"
    shown = ["scheme", *grid.axes, *(["seed"] if grid.has_seeds else [])]
    sizes = [f"{a} ({runs[a].nunique()})" for a in shown]
    return {
        "name": str(meta.get("spec_name") or "unnamed sweep"),
        "spec_path": str(meta.get("spec_path", "")),
        "spec_text": str(meta.get("spec_text", "")),
        "total": len(runs),
        "counts": [(s, int(counts.get(s, 0))) for s in ("ok", "diverged", "failed")],
        "grid": " × ".join(sizes),
        "env": [("torch", distinct("torch_version")), ("devices", distinct("device")),
                ("host", distinct("host")), ("initbench", distinct("initbench")),
                ("python", distinct("python")), ("sweep wall time", wall), ("created", created)],
        "target": (f"train loss ≤ {grid.metrics.target_loss:g}" if grid.metrics.target_loss is not None
                   else f"train loss ≤ {grid.metrics.target_ratio:g} × its initial value"),
    }


def failures(runs: pd.DataFrame) -> str:
    """Distinct error messages of failed jobs with counts (most common first), or ''."""
    failed = runs[runs["status"] == "failed"]
    if failed.empty:
        return ""
    errors = failed.assign(error=failed["error"].astype(str).str.slice(0, 300))
    table = (errors.groupby(["scheme", "error"]).size().rename("jobs").reset_index()
             .sort_values("jobs", ascending=False).head(20))
    return html(table[["jobs", "scheme", "error"]])


# --- leaderboard ------------------------------------------------------------------
def _with_ci(fmt_value, value: float, low: float, high: float) -> str:
    return fmt_value(value) if np.isnan(low) else f"{fmt_value(value)} [{fmt_value(low)}, {fmt_value(high)}]"


def leaderboard(grid: Grid) -> tuple[str, str]:
    """Per scheme (per combination of extra axes): success rate, median steps with CI, final loss, wins."""
    facets, note = grid.facets(limit=6)
    rows = []
    for f, (facet, mask) in enumerate(facets):
        sub = grid.runs[mask]
        wins = _wins(grid, sub)
        for scheme, g in sub.groupby("scheme", sort=False):
            steps = median_ci(g["steps"].to_numpy(dtype=float))
            loss = median_ci(g["final_loss"].to_numpy(dtype=float))
            counts = g["status"].value_counts()
            rows.append({"_facet": f, **({"setting": facet} if facet else {}), "scheme": scheme,
                         "runs": len(g),
                         "ok / diverged / failed": " / ".join(str(int(counts.get(s, 0)))
                                                              for s in ("ok", "diverged", "failed")),
                         "success rate": g["steps_to_target"].notna().mean(),
                         "median steps to target [95% CI]": _with_ci(_steps, *steps),
                         "median final loss [95% CI]": _with_ci(_num, *loss),
                         "cells won": wins.get(scheme, np.nan),
                         "_steps": steps[0] if not np.isnan(steps[0]) else np.inf, "_loss": loss[0]})
    table = pd.DataFrame(rows).sort_values(["_facet", "success rate", "_steps", "_loss"],
                                           ascending=[True, False, True, True], kind="stable")
    table.insert(0, "rank", table.groupby("_facet").cumcount() + 1)
    table["success rate"] = table["success rate"].map(lambda v: f"{v:.0%}")
    table["cells won"] = table["cells won"].map(lambda v: "—" if np.isnan(v) else f"{v:.0%}")
    return html(table.drop(columns=["_facet", "_steps", "_loss"])), note


def _wins(grid: Grid, runs: pd.DataFrame) -> dict[str, float]:
    """Share of cells where each scheme's median steps is the lowest (ties win for each)."""
    usable = runs[runs["status"] != "failed"]
    if usable.empty or not usable["steps_to_target"].notna().any():
        return {}
    cells = grid.cell_cols or ["_cell"]
    med = cell_medians(grid, usable.assign(_cell=0), ["scheme", *cells])
    table = med.set_index([*cells, "scheme"])["steps"].unstack("scheme")
    frac, _ = performance_profile(table, np.array([1.0]))
    return frac.iloc[0].to_dict()


def seeds_needed(grid: Grid) -> str:
    """Seeds per cell for a CI of the mean steps to target 10% / 25% wide (see bench.metrics.seeds_needed)."""
    from bench.metrics import seeds_needed as needed

    runs = grid.runs[grid.runs["status"] == "ok"]
    cells = [c for c in grid.cell_cols if c in runs]
    table = needed(runs, cells)
    if table.empty:
        return ""
    table = table.rename(columns={"init": "scheme", "cells": "cells measured", "mean": "mean steps",
                                  "seed_sd": "sd over seeds", "seeds_for_0.1": "seeds for CI 10% wide",
                                  "seeds_for_0.25": "seeds for CI 25% wide"})
    for col in ("mean steps", "sd over seeds"):
        table[col] = table[col].map(lambda v: f"{v:.0f}")
    return html(table)


# --- regression -----------------------------------------------------------------------
def advice(directory: Path) -> dict[str, Any] | None:
    """bench.advise's screen, ranking and paragraph (``DIR/advice.json``), or None if absent."""
    path = Path(directory) / "advice.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"paragraph": f"advice.json is unreadable ({err})", "screen": "", "ranking": ""}
    screen = pd.DataFrame(doc.get("screen", []))
    ranking = pd.DataFrame(doc.get("ranking", []))
    return {"paragraph": str(doc.get("advice", "(the sweep is still running)")),
            "screen": html(screen) if len(screen) else "",
            "ranking": html(ranking.drop(columns=["good_lrs"], errors="ignore")) if len(ranking) else ""}


def regression(directory: Path) -> dict[str, Any] | None:
    """The regression check's verdict (``DIR/regression.json`` from bench.regress), or None if absent.

    Returns a dict with ``passed``, ``summary`` (one line), ``table`` (regressions and improvements)
    and ``lists`` (missing, new and crashed cells), ready for the template.
    """
    path = Path(directory) / "regression.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        rows = pd.DataFrame(doc.get("rows", []))
    except (OSError, ValueError) as err:
        return {"passed": False, "summary": f"regression.json is unreadable ({err})", "baseline": "",
                "table": "", "lists": []}
    shown = rows[rows["verdict"].isin(["regression", "improvement"])] if "verdict" in rows else rows.iloc[:0]
    shown = shown.sort_values(["verdict", "cell", "metric"], ascending=[False, True, True])
    cols = [c for c in ("verdict", "cell", "metric", "baseline", "current", "change_text", "tolerance", "q",
                        "message") if c in shown]
    table = html(shown[cols].rename(columns={"change_text": "change"})) if len(shown) else ""
    lists = [(name, [str(x) for x in doc.get(key) or []]) for key, name in
             (("missing", "cells in the baseline but not in this sweep"),
              ("new", "cells in this sweep but not in the baseline"))]
    crashed = doc.get("crashed") or {}
    if crashed:
        items = crashed.items() if isinstance(crashed, dict) else enumerate(crashed)
        lists.append(("cells with crashed jobs", [f"{k}: {v}" for k, v in items]))
    return {"passed": bool(doc.get("passed")), "summary": str((doc.get("summary") or {}).get("text", "")),
            "baseline": str(doc.get("baseline", "")), "table": table, "lists": [x for x in lists if x[1]]}


# --- pathologies ------------------------------------------------------------------
def _measures(runs: pd.DataFrame) -> pd.DataFrame:
    """The value behind each flag, per run."""
    col = lambda name: runs[name] if name in runs else pd.Series(np.nan, index=runs.index)  # noqa: E731
    return pd.DataFrame({
        "grad_ratio_init": col("grad_ratio_init"), "weight_growth": col("weight_growth"),
        "dead_frac": np.fmax(col("dead_frac_init"), col("dead_frac_final")),
        "best/initial loss": col("best_loss") / col("initial_loss"), "diverged_at": col("diverged_at"),
        "first_grad_init": col("first_grad_init")},
        index=runs.index)


def pathologies(grid: Grid) -> dict[str, str]:
    """Tables: flag rules with counts and measured values; counts by scheme; flagged runs grouped by cell."""
    runs = grid.runs
    flags = runs["pathologies"].fillna("").astype(str).str.get_dummies(sep=",") if "pathologies" in runs \
        else pd.DataFrame(index=runs.index)
    flags = flags.drop(columns=[c for c in flags.columns if not c.strip()])  # unflagged runs: ''
    if flags.empty or not flags.to_numpy().any():
        return {"empty": "no run was flagged"}
    m = grid.metrics
    measures = _measures(runs)
    rules = {
        "vanishing_gradients": ("grad_ratio_init", f"first/last layer gradient norm < {m.vanishing_ratio:g} "
                                "at step 0 (or first-layer gradient exactly 0)"),
        "exploding_gradients": ("grad_ratio_init", f"first/last layer gradient norm > {m.exploding_ratio:g} "
                                "at step 0"),
        "exploding_weights": ("weight_growth", f"final/initial weight norm > {m.weight_growth_max:g}"),
        "dead_units": ("dead_frac", f"share of dead hidden units > {m.dead_max:g} at step 0 or at the end"),
        "stalled": ("best/initial loss", f"best loss > {m.stall_ratio:g} × initial and never reached the "
                    "target"),
        "diverged": ("diverged_at", f"loss non-finite or > {m.divergence_ratio:g} × initial (step)"),
    }
    rule_rows = []
    for flag in [f for f in PATHOLOGIES if f in flags] + [f for f in flags if f not in PATHOLOGIES]:
        measure, rule = rules.get(flag, ("", "see the metrics docs"))
        hit = flags[flag].astype(bool)
        values = measures.loc[hit, measure].to_numpy(dtype=float) if measure else np.array([])
        finite = values[np.isfinite(values)]
        summary = ("—" if not len(finite) else
                   f"{np.median(finite):.3g} [{finite.min():.3g}, {finite.max():.3g}]")
        if flag == "vanishing_gradients":
            zero = int((measures.loc[hit, "first_grad_init"] == 0).sum())
            summary += f"; first-layer gradient exactly 0 in {zero} runs" if zero else ""
        rule_rows.append({"flag": flag, "rule": rule, "runs flagged": f"{int(hit.sum())} / {len(runs)}",
                          "measured": measure or "—", "median [min, max] among flagged": summary})
    order = [f for f in PATHOLOGIES if f in flags] + [f for f in flags if f not in PATHOLOGIES]
    by_scheme = flags[order].groupby(runs["scheme"]).sum().reindex(grid.schemes).fillna(0).astype(int)
    by_scheme.insert(0, "any flag", flags.any(axis=1).groupby(runs["scheme"]).sum().reindex(by_scheme.index))
    by_scheme.insert(0, "runs", runs.groupby("scheme").size().reindex(by_scheme.index))
    by_scheme = by_scheme.reset_index()
    out = {"empty": "", "by_axis": "", "rules": html(pd.DataFrame(rule_rows)), "by_scheme": html(by_scheme)}
    if grid.y_axis:
        flagged = flags.any(axis=1)
        counts = (pd.DataFrame({"scheme": runs["scheme"], grid.y_axis: runs[grid.y_axis], "flagged": flagged})
                  .groupby(["scheme", grid.y_axis], sort=False)["flagged"].agg(["sum", "size"]))
        text = counts["sum"].astype(int).astype(str) + " / " + counts["size"].astype(str)
        text = text.unstack(grid.y_axis)
        text = text.reindex(index=[s for s in grid.schemes if s in text.index],
                            columns=[v for v in grid.values[grid.y_axis] if v in text.columns])
        text.columns = [f"{grid.y_axis}={fmt(v)}" for v in text.columns]
        out["by_axis"] = html(text.reset_index())
        out["by_axis_name"] = grid.y_axis
    out["detail"], out["detail_note"] = _detail(grid, flags, measures)
    return out


def _detail(grid: Grid, flags: pd.DataFrame, measures: pd.DataFrame) -> tuple[str, str]:
    runs = grid.runs
    hit = flags.any(axis=1)
    keys = ["scheme", *grid.axes, "pathologies"]
    frame = pd.concat([runs.loc[hit, keys], measures.loc[hit]], axis=1)
    frame["pathologies"] = frame["pathologies"].str.replace(",", ", ")
    grouped = frame.groupby(keys, sort=False, dropna=False)
    table = grouped.median(numeric_only=True)
    table.insert(0, "runs", grouped.size())
    table = table.reset_index()
    rank = {"scheme": {s: i for i, s in enumerate(grid.schemes)},
            **{a: {v: i for i, v in enumerate(grid.values[a])} for a in grid.axes}}
    table = table.sort_values(["scheme", *grid.axes], key=lambda col: col.map(rank.get(col.name, {})),
                              kind="stable")
    for axis in grid.axes:
        table[axis] = table[axis].map(fmt)
    for col in measures.columns:
        table[col] = table[col].map(_num)
    note = (f"{len(table)} groups of flagged runs, each with the measured values behind its flags (runs "
            "with the same settings and flags; values are medians over their seeds).")
    if len(table) > DETAIL_ROWS:
        note += f" The first {DETAIL_ROWS} are shown; every run is in runs.csv."
    return html(table.head(DETAIL_ROWS)), note


# --- data files -------------------------------------------------------------------
def arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Columns Arrow can't type (mixed str/float, e.g. init_bias) become text."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            try:
                pa.array(out[col], from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                out[col] = out[col].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v))
                                        else fmt(v))
    return out


def write_data(directory: Path, runs: pd.DataFrame, summary: pd.DataFrame) -> list[dict[str, Any]]:
    """Write runs and summary as CSV and Parquet beside the report; returns what was written."""
    written = []
    for stem, df in (("runs", runs), ("summary", summary)):
        safe = arrow_safe(df)
        for suffix in ("csv", "parquet"):
            path = directory / f"{stem}.{suffix}"
            tmp = path.with_name(f".{path.name}.tmp")
            if suffix == "csv":
                safe.to_csv(tmp, index=False)
            else:
                safe.to_parquet(tmp, index=False)
            tmp.replace(path)
            written.append({"name": path.name, "rows": len(df), "columns": df.shape[1],
                            "size": f"{path.stat().st_size / 1024:.0f} KiB"})
    return written
