"""Figure plumbing (PNG data URIs, one style) and the grid-wide figures: performance profile, heatmaps.

Every figure function returns a :class:`Figure`; when there is nothing to draw it
carries the reason in ``empty`` instead of an image, and the page says so.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import matplotlib

# Before pyplot: the report is built on machines without a display. A backend the session already
# chose (a notebook's inline backend, MPLBACKEND) is left alone, so bench.plot's figures show there.
if "matplotlib.pyplot" not in sys.modules and "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402
from seaborn.utils import relative_luminance  # noqa: E402

from bench.report.grid import Grid, cell_medians, fmt, label  # noqa: E402

DPI = 100
LINESTYLES = ("-", "--", "-.", ":")  # a second cue besides colour where lines overlap
SPECIAL = {  # cells of a heatmap that have no number: (face colour, hatch, text, legend)
    "div": ("#c8c8c8", "///", "div", "div: most seeds diverged"),
    "never": ("#ececec", "", "never", "never: median seed never reached the target"),
    "fail": ("#7f7f7f", "xx", "fail", "fail: every seed crashed"),
    "nan": ("#ffffff", "..", "n/a", "n/a: metric undefined"),
}


@dataclass
class Figure:
    """One figure of the page: an embedded PNG, or the reason there is none."""

    title: str
    caption: str = ""
    uri: str = ""  # data:image/png;base64,...
    empty: str = ""  # why there is no figure (the page shows it instead)
    table: str = ""  # an optional pandas table (HTML, escaped) shown under the figure
    # Per-module detail too long for the page (HTML, escaped), shown folded in a <details> element
    details: str = ""
    details_summary: str = ""


def text(value: object) -> str:
    """User text for matplotlib: '$' would start mathtext (and fail on unbalanced input)."""
    return str(value).replace("$", r"\$")


@contextmanager
def style():
    """The report's one look: seaborn whitegrid, notebook context, readable at laptop width."""
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85),
          "figure.dpi": DPI, "axes.titlesize": 11, "axes.titleweight": "bold", "legend.frameon": False}
    with plt.rc_context(rc):
        yield


_KEPT: ContextVar[list | None] = ContextVar("kept_figures", default=None)


@contextmanager
def keep():
    """Inside this block :func:`to_uri` keeps each figure (in the yielded list) instead of rendering it.

    This is how ``bench.plot`` hands the report's own figures to a notebook: the builders stay
    the one place each figure is drawn.
    """
    kept: list = []
    token = _KEPT.set(kept)
    try:
        yield kept
    finally:
        _KEPT.reset(token)


def to_uri(fig: plt.Figure) -> str:
    """Render a figure as a base64 PNG data URI (and free it); inside :func:`keep`, keep it instead."""
    kept = _KEPT.get()
    if kept is not None:
        plt.close(fig)  # out of pyplot's registry only: the caller owns it, and a notebook shows it once
        kept.append(fig)
        return ""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def positive_floor(values: np.ndarray) -> float:
    """Where zeros go on a log axis: a decade below the smallest positive value."""
    values = np.asarray(values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    return float(positive.min()) / 10 if len(positive) else 1e-12


def log_ticks(axis) -> None:
    """Plain-number labels on a log axis (0.2, 0.5, 1, ...), minor labels only on short ranges."""
    lo, hi = sorted(axis.get_view_interval())
    decades = np.log10(hi / lo) if lo > 0 and np.isfinite(hi / lo) else 99
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if decades < 0.6:  # a narrow range: every minor tick needs a label, or the axis has none
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    elif decades < 1.5:
        axis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** np.floor(np.log10(v)), 6) in (2, 5) else ""))
    else:
        axis.set_minor_formatter(NullFormatter())


def present(grid: Grid, schemes: pd.Series) -> list[str]:
    """The grid's schemes that occur in ``schemes`` (a column), in the grid's order."""
    seen = set(schemes.unique())  # once: a set built per scheme cost seconds on 10,000 jobs' traces
    return [s for s in grid.schemes if s in seen]


def legend(fig, grid: Grid, schemes=None, title: str = "scheme", **extra) -> None:
    """One legend for the whole figure, outside on the right: a line per scheme (colour + style)."""
    schemes = grid.schemes if schemes is None else schemes
    styles = {s: LINESTYLES[i % len(LINESTYLES)] for i, s in enumerate(grid.schemes)}
    handles = [Line2D([], [], color=grid.colors[s], lw=2.2, ls=styles[s], marker=extra.get("marker"),
                      label=text(s)) for s in schemes]
    handles += extra.get("more", [])
    fig.legend(handles=handles, loc="outside right upper", title=title, fontsize=8.5)


# --- performance profile ----------------------------------------------------------
def performance_profile(steps: pd.DataFrame, taus: np.ndarray) -> tuple[pd.DataFrame, pd.Series]:
    """Dolan-More profile over grid cells.

    Args:
        steps: one row per cell, one column per scheme: median steps to target (inf or NaN = never).
        taus: ratios to the best scheme's steps at which to evaluate.

    Returns:
        (fraction of cells each scheme solves within tau x the best, indexed by tau;
        fraction it solves at all, i.e. tau = infinity). A cell no scheme solves counts
        as unsolved for every scheme.
    """
    s = steps.to_numpy(dtype=float)
    s = np.where(np.isnan(s), np.inf, s)
    best = s.min(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(best > 0, s / best, np.where(s == 0, 1.0, np.inf))
    ratio = np.where(np.isfinite(ratio), ratio, np.inf)
    frac = (ratio[None, :, :] <= np.asarray(taus)[:, None, None]).mean(axis=1)
    return (pd.DataFrame(frac, index=taus, columns=steps.columns),
            pd.Series(np.isfinite(ratio).mean(axis=0), index=steps.columns))


def profile_figure(grid: Grid) -> Figure:
    title = "Performance profile: steps to target"
    runs = grid.runs[grid.runs["status"] != "failed"]
    if runs.empty:
        return Figure(title, empty="no data: every job failed")
    if not runs["steps_to_target"].notna().any():
        return Figure(title, empty="no data: no run reached the target loss, so there is nothing to rank")
    cells = grid.cell_cols
    med = cell_medians(grid, runs.assign(_cell=0), ["scheme", *(cells or ["_cell"])])
    table = med.set_index([*(cells or ["_cell"]), "scheme"])["steps"].unstack("scheme")  # cells x schemes
    table = table.reindex(columns=[s for s in grid.schemes if s in table.columns])
    taus = np.geomspace(1, 4, 241)
    frac, ever = performance_profile(table, taus)
    with style():
        fig, (ax, ax_inf) = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True, layout="constrained",
                                         gridspec_kw={"width_ratios": [7, 1]})
        for i, scheme in enumerate(frac.columns):
            ls = LINESTYLES[i % len(LINESTYLES)]
            ax.step(taus, frac[scheme], where="post", color=grid.colors[scheme], lw=2.2, ls=ls,
                    label=text(scheme))
            ax_inf.plot([i], [ever[scheme]], marker="o", ms=8, color=grid.colors[scheme], ls="none")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 1.5, 2, 3, 4], ["1", "1.5", "2", "3", "4"])
        ax.set_xlim(1, 4)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("τ: within τ × the best scheme's steps (log scale)")
        ax.set_ylabel("fraction of grid cells")
        ax_inf.set_xlim(-0.8, len(frac.columns) - 0.2)
        ax_inf.set_xticks([(len(frac.columns) - 1) / 2], ["τ = ∞"])
        ax_inf.set_xlabel("reached at all")
        ax_inf.grid(axis="x", visible=False)
        legend(fig, grid, list(frac.columns))
        fig.suptitle(title, fontweight="bold")
    caption = (f"A cell is one combination of {', '.join(cells) if cells else 'settings'} (all but seed and "
               f"scheme); {len(table)} cells. In each cell a scheme's steps are the median over seeds "
               "(a seed that never reaches the target counts as infinitely slow). A curve at height y over τ "
               "means the scheme reached the target within τ times the fastest scheme's steps in a fraction "
               "y of the cells: higher and further left is better; its value at τ = 1 is the share of cells "
               "it wins (ties count for each). The right panel is the share of cells it reaches the target "
               "at all. Cells no scheme solves count against every scheme.")
    return Figure(title, caption, to_uri(fig))


# --- heatmaps ---------------------------------------------------------------------
def heatmap_figure(grid: Grid, metric: str) -> Figure:
    """Median over seeds of ``steps`` or ``final_loss`` on the y_axis x x_axis grid, one panel per scheme."""
    name = "steps to target" if metric == "steps" else "final train loss"
    title = f"Heatmap: {name}"
    if grid.y_axis is None:
        return Figure(title, empty="no data: the grid has no axis besides the scheme and seed")
    runs = grid.runs
    if (runs["status"] == "failed").all():
        return Figure(title, empty="no data: every job failed")
    y, x = grid.y_axis, grid.x_axis
    xs = grid.values[x] if x else [""]
    ys = grid.values[y]
    facets, note = grid.facets(limit=4)
    meds = [cell_medians(grid, runs[mask].assign(_x=""), ["scheme", y, x or "_x"]) for _, mask in facets]
    values = pd.concat(meds)[metric].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]  # the colour scale spans what the panels show
    log = metric == "final_loss"
    if log:
        finite = finite[finite > 0]
    if len(finite) == 0:
        norm = Normalize(0, 1)
    elif log:
        norm = LogNorm(finite.min(), max(finite.max(), finite.min() * 1.0001))
    else:
        norm = Normalize(finite.min(), max(finite.max(), finite.min() + 1))
    cmap = sns.color_palette("viridis_r", as_cmap=True)
    panel = max(2.3, 0.42 * len(xs) + 0.7)  # inches per panel: wide enough for its column labels
    ncol = max(1, min(len(grid.schemes), 5, int(12.5 // panel)))
    blocks = -(-len(grid.schemes) // ncol)
    unit = "steps" if metric == "steps" else "loss, log scale"
    with style():
        height = (0.32 * len(ys) + 1.0) * blocks + (0.35 if facets[0][0] else 0)
        width = max(panel * ncol + 1.6, 6.5)
        fig = plt.figure(layout="constrained", figsize=(width, height * len(facets) + 0.7))
        subfigs = fig.subfigures(len(facets), 1, squeeze=False)[:, 0] if len(facets) > 1 else [fig]
        used: set[str] = set()
        for sub, (facet, _), med in zip(subfigs, facets, meds, strict=True):
            axes = sub.subplots(blocks, ncol, squeeze=False)
            for ax in axes.ravel()[len(grid.schemes):]:
                ax.set_visible(False)
            for i, scheme in enumerate(grid.schemes):
                ax = axes[i // ncol, i % ncol]
                mine = med[med["scheme"] == scheme]
                used |= _heat_panel(ax, mine, metric, y, x or "_x", ys, xs, norm, cmap)
                ax.set_title(text(scheme), color=grid.colors[scheme])
                ax.set_ylabel(label(y) if i % ncol == 0 else "")
                ax.set_xlabel(label(x) if x else "")
            if facet:
                sub.suptitle(text(facet), fontsize=10.5, fontweight="bold", color="#444")
            if len(finite):  # one colour bar per row (the same scale), so every row keeps its width
                bar = sub.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist(),
                                   shrink=0.9, label=f"median {name}\n({unit})")
                if log:
                    log_ticks(bar.ax.yaxis)
        handles = [Patch(facecolor=SPECIAL[k][0], hatch=SPECIAL[k][1], edgecolor="#555", label=SPECIAL[k][3])
                   for k in SPECIAL if k in used]
        if len(finite):
            handles.insert(0, Patch(facecolor=cmap(0.2), edgecolor="#555", label="median over seeds"))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
        fig.suptitle(title, fontweight="bold")
    caption = (f"Each cell is the median over seeds of {name} at one {y}"
               + (f" and {x}" if x else "") + "; all panels share one colour scale (brighter is better). "
               + ("Steps are counted at the logging resolution. " if metric == "steps" else
                  "Final loss is the train loss at the last logged step (undefined for diverged runs). ")
               + "Cells without a number are marked: 'div' if most seeds diverged, "
               + ("'never' if the median seed never reached the target, " if metric == "steps" else "")
               + "'fail' if every seed crashed. " + note)
    return Figure(title, caption, to_uri(fig))


def _heat_panel(ax, med: pd.DataFrame, metric: str, y: str, x: str, ys: list, xs: list,
                norm, cmap) -> set[str]:
    """Draw one scheme's heatmap; returns which special-cell kinds it used."""
    data = np.full((len(ys), len(xs)), np.nan)
    kinds = np.full((len(ys), len(xs)), "", dtype=object)
    yi = {v: i for i, v in enumerate(ys)}
    xi = {v: i for i, v in enumerate(xs)}
    col = {c: k for k, c in enumerate(med.columns)}
    for row in med.itertuples(index=False, name=None):  # one row per heatmap cell: a few dozen at most
        i, j = yi.get(row[col[y]]), xi.get(row[col[x]])
        if i is None or j is None:
            continue
        value, n_diverged = row[col[metric]], row[col["n_diverged"]]
        usable = row[col["n"]] - row[col["n_failed"]]
        if usable == 0:
            kinds[i, j] = "fail"
        elif n_diverged and 2 * n_diverged >= usable:
            kinds[i, j] = "div"
        elif np.isinf(value) and metric == "steps":
            kinds[i, j] = "never"
        elif not np.isfinite(value) or (metric == "final_loss" and value <= 0):
            kinds[i, j] = "nan"
        else:
            data[i, j] = value
    # pcolormesh, not sns.heatmap: seaborn draws the whole figure once per panel (to check
    # tick-label overlap), which makes a many-panel figure quadratic in the number of panels.
    ax.pcolormesh(np.ma.masked_invalid(data), cmap=cmap, norm=norm, edgecolors="white", linewidth=0.5)
    ax.set_xticks(np.arange(len(xs)) + 0.5, [fmt(v) for v in xs])
    ax.set_yticks(np.arange(len(ys)) + 0.5, [fmt(v) for v in ys])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for (i, j), value in np.ndenumerate(data):
        if np.isfinite(value):
            dark = relative_luminance(cmap(norm(value))) < 0.408
            ax.text(j + 0.5, i + 0.5, f"{value:.0f}" if metric == "steps" else f"{value:.2g}", ha="center",
                    va="center", fontsize=7.5, color="white" if dark else "#111")
    used = set()
    for (i, j), kind in np.ndenumerate(kinds):
        if kind:
            face, hatch, label_, _ = SPECIAL[kind]
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=face, hatch=hatch, edgecolor="#8a8a8a", lw=0))
            ax.text(j + 0.5, i + 0.5, label_, ha="center", va="center", fontsize=7.5,
                    color="white" if kind == "fail" else "#333", style="italic")
            used.add(kind)
    ax.set_xlim(0, len(xs))
    ax.set_ylim(len(ys), 0)
    ax.tick_params(axis="both", labelsize=8, length=0)
    return used
