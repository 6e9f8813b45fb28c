"""The coordinate check (the ``mup`` package's ``coord_check``): does each module's output grow with width?

For a sweep with ``width`` as an axis, each module's *coordinate size* (the RMS of its output
entries, sqrt(mean^2 + std^2) from the probes) is compared across widths at the first few
logged steps. A width-stable parametrization (muP) keeps every module flat in width; the
standard one grows after an update under Adam, the output fastest. The log-log slope of size
against width is fitted per scheme, step and module, and a module whose slope exceeds
:data:`SLOPE_MAX` is flagged. The flag needs several widths, so it belongs to a scheme, never to
a single job.

The computation (:func:`sizes`, :func:`slopes`) is pure pandas; ``bench.reproductions`` reads the
``mup_coord`` sweep through it too.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from bench import schema

SLOPE_MAX = 0.25  # a module whose coordinates grow faster than width^0.25 is flagged
STEPS_SHOWN = 4  # panels: step 0 and the next logged steps (mup's check looks at the first few updates)
BLOCK = re.compile(rf"^{schema.BLOCK}(?:\.|$)")  # a block or a module inside one: its number


def sizes(layers: pd.DataFrame, runs: pd.DataFrame, key: str = "init") -> pd.DataFrame:
    """Each module output's coordinate size per ``key`` (init or scheme), step, module and width.

    The size is sqrt(mean^2 + std^2), the RMS of the module's output entries, averaged over the
    jobs of a (key, width) pair (its seeds). mup's ``get_coord_data`` records mean |x|; the RMS
    differs from it by a constant factor for a given distribution, so the slopes agree.

    Args:
        layers: ``Results.layers`` (probe statistics; only ``output`` and ``act`` rows are read).
        runs: one row per job with ``job_id``, ``key`` and ``width``.
        key: the column that names what is compared (``init`` or the report's ``scheme``).

    Returns:
        Columns ``key``, step, module (the dotted name), index (forward order), width, size.
    """
    rows = layers[layers["param"].isin(["output", "act"])]
    data = rows.merge(runs[["job_id", key, "width"]], on="job_id")
    data = data.assign(size=np.sqrt(data["mean"].astype(float) ** 2 + data["std"].astype(float) ** 2),
                       module=data["layer"].astype(str))
    return (data.groupby([key, "step", "module", "width"], observed=True)
            .agg(index=("index", "min"), size=("size", "mean")).reset_index())


def slopes(sized: pd.DataFrame, key: str = "init") -> pd.DataFrame:
    """Per ``key``, step and module: the log-log slope of coordinate size against width.

    0 is flat in width (as muP promises), > 0 grows with width; ``grows`` is slope > SLOPE_MAX.
    Widths where the size is zero or not finite (a zero readout at step 0, a diverged job) are
    left out of the fit; a module with fewer than two usable widths gets no row.
    """
    rows = []
    for (name, step, module), group in sized.groupby([key, "step", "module"], sort=False):
        ok = group[(group["size"] > 0) & np.isfinite(group["size"])]
        if ok["width"].nunique() >= 2:
            slope = float(np.polyfit(np.log(ok["width"].astype(float)), np.log(ok["size"]), 1)[0])
            rows.append({key: name, "step": int(step), "module": module, "index": int(group["index"].min()),
                         "slope": slope, "grows": slope > SLOPE_MAX})
    return pd.DataFrame(rows, columns=[key, "step", "module", "index", "slope", "grows"])


def first_steps(sized: pd.DataFrame, n: int = STEPS_SHOWN) -> list[int]:
    """The first ``n`` logged steps (step 0 included when it was logged)."""
    return sorted(int(s) for s in sized["step"].unique())[:n]


def top_level(modules: pd.Series) -> pd.Series:
    """True for a module outside every residual block: the ``blocks.<i>`` outputs (the residual
    stream after block i) and the modules before and after the blocks (embeddings, stem, head)."""
    names = modules.astype(str)
    return ~names.str.match(rf"{schema.BLOCK}\.")


def block_number(modules: pd.Series) -> pd.Series:
    """The block a module belongs to (``blocks.3.attn.proj`` -> 3), NaN outside the blocks."""
    return pd.to_numeric(modules.astype(str).str.extract(BLOCK, expand=False), errors="coerce")


def scheme_flags(slope_table: pd.DataFrame, key: str = "scheme") -> pd.DataFrame:
    """Per ``key``: modules checked, modules that grow with width (at any shown step), and the
    steepest slope with its module and step."""
    rows = []
    for name, group in slope_table.groupby(key, sort=False):
        top = group.loc[group["slope"].idxmax()]
        grown = group.loc[group["grows"], "module"].unique()
        rows.append({key: name, "modules": group["module"].nunique(), "grow with width": len(grown),
                     "max slope": float(top["slope"]), "at": f"{top['module']}, step {int(top['step'])}",
                     "flag": "activations_grow_with_width" if len(grown) else ""})
    return pd.DataFrame(rows, columns=[key, "modules", "grow with width", "max slope", "at", "flag"])


def wide(slope_table: pd.DataFrame, key: str = "scheme") -> pd.DataFrame:
    """The slopes as one row per ``key`` and module (forward order), one column per step, and a flag
    column ``grows with width`` (yes when any shown step's slope exceeds SLOPE_MAX)."""
    if slope_table.empty:
        return pd.DataFrame(columns=[key, "module"])
    table = slope_table.pivot_table(index=[key, "index", "module"], columns="step", values="slope",
                                    aggfunc="first", sort=False)
    table.columns = [f"slope, step {int(s)}" for s in table.columns]
    grows = slope_table.groupby([key, "index", "module"], sort=False)["grows"].any()
    table["grows with width"] = grows.reindex(table.index).map({True: "yes", False: ""})
    order = {name: i for i, name in enumerate(dict.fromkeys(slope_table[key]))}  # as the caller ordered
    table = table.reset_index()
    table = table.assign(_rank=table[key].map(order)).sort_values(["_rank", "index"], kind="stable")
    table = table.drop(columns="_rank")
    return table.drop(columns="index").reset_index(drop=True)
