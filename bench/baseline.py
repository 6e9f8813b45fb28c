"""Baselines: a sweep's runs grouped into cells, and the committable file that keeps them.

A *cell* is a grid point without its seed: every setting but ``seed``. Its key is a
hash of those settings, the same on any machine, so a rerun with other seeds (or more
of them) lands in the same cells. A baseline file keeps, per cell, each seed's status
and watched metric values, plus the spec text, the environment and a format version.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.environment import VERSION as PACKAGE_VERSION
from bench.errors import UserError
from bench.files import write_atomic
from bench.job import SETTING_NAMES
from bench.schema import axis_column, hashed
from bench.verdict import STORED, Cell

FORMAT = "initbench-baseline"
VERSION = 1
STATUSES = ("ok", "diverged", "failed")
HINT = "make one with: python -m bench.regress save DIR --to FILE.json"


# --- cells: a sweep's runs grouped by every setting but the seed -------------------------
def _canon(value: Any) -> Any:
    """JSON-stable setting values: 1 and 1.0 hash alike (pandas turns int columns with gaps into floats)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def cell_key(settings: Mapping[str, Any]) -> str:
    """Stable id of a cell: hash of its settings without the seed (the same on any machine)."""
    rest = hashed({k: v for k, v in settings.items() if k != "seed"})
    blob = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cells_from_runs(runs) -> dict[str, Cell]:
    """Group a runs table (``bench.load(DIR).runs``) into cells keyed by :func:`cell_key`."""
    if runs is None or not len(runs):
        raise UserError("the sweep has no runs yet; run bench.sweep first")
    columns = [c for c in runs.columns if c in SETTING_NAMES or c.startswith(("init.", "task."))]
    cells: dict[str, Cell] = {}
    for row in runs.to_dict("records"):
        settings = hashed({c: _canon(row[c]) for c in columns if c != "seed" and not _missing(row[c])})
        key = cell_key(settings)
        cell = cells.setdefault(key, Cell(key, settings, [], []))
        cell.seeds.append(int(row["seed"]))
        cell.status.append(str(row["status"]))
        if row["status"] == "failed" and row.get("error"):
            cell.errors.append(f"seed {int(row['seed'])}: {row['error']}")
        for metric in STORED:
            value = row.get(metric)
            cell.values.setdefault(metric, []).append(math.nan if _missing(value) else float(value))
    return cells


def labels(cells: Sequence[Cell], axes: Sequence[str] = ()) -> dict[str, str]:
    """A readable label per cell: the spec's axes that vary, plus other varying settings only if needed.

    Settings that follow from an axis (a scheme's ``init.gain`` follows ``init``) stay out of the label.
    """
    def varies(k: str) -> bool:
        return len({json.dumps(c.settings.get(k)) for c in cells}) > 1

    def text(keys: list[str]) -> dict[str, str]:
        return {c.key: " ".join(f"{k}={_show(c.settings.get(k, '-'))}" for k in keys) or "(all)"
                for c in cells}

    names = [axis_column(a) for a in axes]
    keys = [k for k in dict.fromkeys(names) if k != "seed" and varies(k)]
    out = text(keys)
    if len(set(out.values())) < len(out):
        keys += sorted(k for k in {k for c in cells for k in c.settings} if k not in keys and varies(k))
        out = text(keys)
    return out


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# --- the baseline file ------------------------------------------------------------------------
def encode(x: float) -> float | str | None:
    """A float for strict JSON: NaN as null, infinities as "inf" / "-inf"."""
    if math.isnan(x):
        return None
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def decode(x: Any) -> float:
    if x is None:
        return math.nan
    if x in ("inf", "-inf"):
        return float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{x!r} is not a number")
    return float(x)


def dumps(doc: Mapping[str, Any], flat: str = "cells") -> str:
    """JSON with one line per item of ``doc[flat]``: a refreshed baseline diffs cell by cell."""
    head = json.dumps({k: v for k, v in doc.items() if k != flat}, indent=1, allow_nan=False)
    items = ",\n".join("  " + json.dumps(item, allow_nan=False) for item in doc.get(flat, []))
    return f'{head[:-2]},\n "{flat}": [\n{items}\n ]\n}}\n'


def save(directory: str | Path, path: str | Path, spec_path: str | None = None) -> dict[str, Any]:
    """Save a sweep's cells (per-seed statuses and metric values) as a baseline file; returns the doc.

    Settings shared by every cell are written once (``settings``); each cell keeps the rest.
    ``spec_path`` names the spec in the file when the sweep ran a rewritten copy of it.
    """
    from bench.store import load

    results = load(directory, traces=False)
    cells = cells_from_runs(results.runs)
    names = labels(list(cells.values()), results.axes)
    first, *rest = cells.values()
    common = {k: v for k, v in first.settings.items() if all(c.settings.get(k, _ABSENT) == v for c in rest)}
    doc = {"format": FORMAT, "version": VERSION,
           "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "environment": {**results.meta.get("env", {}), "saved_by": f"initbench {PACKAGE_VERSION}"},
           "spec": {"name": results.meta.get("spec_name", ""),
                    "path": spec_path or results.meta.get("spec_path", ""), "text": results.spec_text},
           "axes": results.axes, "metrics": list(STORED), "settings": common,
           "cells": [{"key": c.key, "label": names[c.key],
                      "settings": {k: v for k, v in c.settings.items() if k not in common},
                      "seeds": c.seeds, "status": c.status,
                      "values": {m: [encode(v) for v in c.values[m]] for m in STORED}}
                     for c in sorted(cells.values(), key=lambda c: names[c.key])]}
    write_atomic(Path(path), dumps(doc))
    return doc


_ABSENT = object()


@dataclass
class Baseline:
    """A loaded baseline file."""

    path: Path
    cells: dict[str, Cell]
    environment: dict[str, Any]
    spec: dict[str, Any]
    axes: list[str]
    metrics: list[str]
    created: str = ""


def load_baseline(path: str | Path) -> Baseline:
    """Read a baseline; missing, corrupt, foreign or old files are a UserError naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"baseline {path} not found; {HINT}") from None
    except OSError as err:
        raise UserError(f"cannot read baseline {path}: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"baseline {path} is not valid JSON ({err}); {HINT}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path} is not an initbench baseline (expected format {FORMAT!r}); {HINT}")
    if doc.get("version") != VERSION:
        raise UserError(f"{path} has baseline format version {doc.get('version')!r}, this initbench reads "
                        f"{VERSION}; re-save it with: python -m bench.regress save DIR --to {path}")
    entries, metrics, common = doc.get("cells"), doc.get("metrics"), doc.get("settings", {})
    if not isinstance(entries, list) or not entries or not isinstance(metrics, list) \
            or not isinstance(common, dict):
        raise UserError(f"{path}: 'cells' must be a non-empty list, 'metrics' a list, 'settings' a table; "
                        f"{HINT}")
    cells = {}
    for i, entry in enumerate(entries):
        try:
            n = len(entry["seeds"])
            cell = Cell(str(entry["key"]), {**common, **entry["settings"]}, [int(s) for s in entry["seeds"]],
                        [str(s) for s in entry["status"]],
                        {m: [decode(v) for v in entry["values"][m]] for m in metrics})
            if not n or len(cell.status) != n or any(len(v) != n for v in cell.values.values()) \
                    or not set(cell.status) <= set(STATUSES):
                raise ValueError("seeds, status and values must be lists of one length")
            if cell_key(cell.settings) != cell.key:
                raise ValueError("its key does not match its settings (edited by hand?)")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{path}: cell #{i} is malformed ({err}); {HINT}") from None
        cells[cell.key] = cell
    return Baseline(path, cells, dict(doc.get("environment") or {}), dict(doc.get("spec") or {}),
                    list(doc.get("axes") or []), metrics, str(doc.get("created", "")))


def subset(cell: Cell, seeds: set[int]) -> Cell:
    """The same cell with only the given seeds."""
    keep = [i for i, s in enumerate(cell.seeds) if s in seeds]
    return Cell(cell.key, cell.settings, [cell.seeds[i] for i in keep], [cell.status[i] for i in keep],
                {m: [v[i] for i in keep] for m, v in cell.values.items()})


# --- a wider seed axis, for a baseline that knows the seed distribution better ----------------
_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-]+)\s*\]\s*(#.*)?$")


def widen_seeds(text: str, where: str, n: int) -> tuple[str, list[int]]:
    """Spec text with ``n`` seeds on the seed axis: the spec's own seeds, then the smallest others.

    The rewrite touches only the seed line(s) and is verified: the new spec must parse to the
    same settings, grid and tables apart from the seeds, or a UserError says to edit a copy.
    """
    from bench import spec as specs

    old = specs.parse(text, where)
    grid = dict(old.grid)
    own = [int(s) for s in grid.get("seed", (dict(old.fixed)["seed"],))]
    seeds = list(dict.fromkeys(own + list(range(n + len(own)))))[: max(n, len(own))]
    lines = text.splitlines()
    table, seed_at, grid_at = "", None, None
    for i, line in enumerate(lines):
        header = _HEADER.match(line)
        if header:
            table = header.group(1)
            grid_at = i if table == "grid" else grid_at
        elif re.match(r"^\s*seed\s*=", line) and table in ("grid", "train"):
            seed_at = (i, table)
    new_line = f"seed = {seeds}"
    if seed_at and seed_at[1] == "grid":
        start, end = seed_at[0], seed_at[0]
        while lines[end].count("]") < 1 and end + 1 < len(lines):  # a list over several lines
            end += 1
        lines[start: end + 1] = [new_line]
    else:
        if seed_at:
            del lines[seed_at[0]]
            grid_at = grid_at - 1 if grid_at is not None and grid_at > seed_at[0] else grid_at
        if grid_at is None:
            lines += ["", "[grid]", new_line]
        else:
            lines.insert(grid_at + 1, new_line)
    new_text = "\n".join(lines) + "\n"
    try:
        new = specs.parse(new_text, where)
    except UserError:
        new = None

    def same(s) -> tuple:
        return (tuple((k, v) for k, v in s.grid if k != "seed"),
                tuple((k, v) for k, v in s.fixed if k != "seed"),
                s.init_params, s.metrics, s.runtime, s.regression, s.name)

    if new is None or same(new) != same(old) or list(dict(new.grid).get("seed", ())) != seeds:
        raise UserError(f"{where}: cannot widen the seed axis automatically; copy the spec, set "
                        f"[grid] seed = {seeds}, sweep it and save that with bench.regress save")
    return new_text, seeds
