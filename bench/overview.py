"""A loaded sweep at a glance: what ``bench.load(DIR)`` shows in a console (``repr``) and in Jupyter (HTML).

Both are cheap at any size (counts and medians, no bootstrap) and short: jobs by
status, each axis with its values, the tables' sizes and the store's path. The HTML
adds a median table by init scheme; every string in it is escaped (spec names,
settings and errors are user text).
"""

from __future__ import annotations

import html
from typing import Any

from bench.schema import STATUSES

MAX_VALUES = 8  # values listed per axis before "..."
MAX_ROWS = 20  # rows of the HTML median table


def _values(results, axis: str) -> list[Any]:
    column = "init." + axis.rsplit(".", 1)[-1] if axis.startswith("init_params.") else axis
    if column not in results.runs:
        return []
    seen = list(dict.fromkeys(v for v in results.runs[column].tolist() if v == v))  # v == v: not NaN
    try:
        return sorted(seen)
    except TypeError:  # mixed types (init_bias: "auto" or a number): first-seen order
        return seen


def _axis_line(results, axis: str) -> str:
    values = _values(results, axis)
    shown = ", ".join(str(v) for v in values[:MAX_VALUES]) + (", ..." if len(values) > MAX_VALUES else "")
    return f"{axis} ({len(values)}): {shown}"


def facts(results) -> list[tuple[str, str]]:
    """(label, text) lines of the summary: sweep, jobs by status, axes, tables, store."""
    runs = results.runs
    counts = runs["status"].value_counts().to_dict() if "status" in runs else {}
    statuses = [s for s in STATUSES if counts.get(s)] + [s for s in counts if s not in STATUSES]
    jobs = f"{len(runs)}" + (": " + ", ".join(f"{counts[s]} {s}" for s in statuses) if statuses else "")
    axes = [_axis_line(results, a) for a in results.axes] or ["none (a single configuration)"]
    tables = (f"runs {len(runs):,} x {runs.shape[1]}, curves {len(results.curves):,} rows, "
              f"layers {len(results.layers):,} rows")
    path = getattr(results, "path", None)
    lines = [("sweep", str(results.meta.get("spec_name", "?"))), ("jobs", jobs)]
    lines += [("axes" if i == 0 else "", text) for i, text in enumerate(axes)]
    lines += [("tables", tables), ("store", str(path) if path else "(not from a store)")]
    return lines


def text(results) -> str:
    """The plain-text summary (``repr``): a few lines, whatever the sweep's size."""
    width = max(len(label) for label, _ in facts(results))
    body = "\n".join(f"  {label:<{width}}  {value}" for label, value in facts(results))
    return f"<initbench Results: tables .runs .curves .layers>\n{body}"


def medians(results):
    """Per init scheme: jobs by status and median steps to target and final loss (None if no init column)."""
    runs = results.runs
    if runs.empty or "init" not in runs or "status" not in runs:
        return None
    table = runs.groupby(runs["init"].astype(str), sort=False)["status"].value_counts().unstack(fill_value=0)
    table = table.reindex(columns=[s for s in STATUSES if s in table.columns])
    for metric in ("steps_to_target", "final_loss"):
        if metric in runs:
            table[f"median {metric}"] = runs.groupby(runs["init"].astype(str), sort=False)[metric].median()
    table.index.name, table.columns.name = "init", None
    return table.head(MAX_ROWS)


def to_html(results) -> str:
    """The HTML summary (Jupyter's ``_repr_html_``): the same facts, and medians by init scheme."""
    rows = "".join(f"<tr><th style='text-align:left'>{html.escape(label)}</th>"
                   f"<td style='text-align:left'>{html.escape(value)}</td></tr>"
                   for label, value in facts(results))
    table = medians(results)
    extra = "" if table is None else table.to_html(escape=True, float_format=lambda v: f"{v:.4g}",
                                                   na_rep="never/n.a.", border=0)
    return f"<div><strong>initbench results</strong><table>{rows}</table>{extra}</div>"
