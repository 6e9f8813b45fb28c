"""Figures about training outcomes along the grid: depth scaling and learning curves."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.report.figures import LINESTYLES, Figure, legend, log_ticks, plt, present, style, text, to_uri
from bench.report.grid import Grid, cell_medians, fmt, label, match, median_ci, quartiles

TRAINS_AT = 0.5  # a scheme "trains" at a depth when at least half of its seeds reach the target


def scale_axes(grid: Grid) -> tuple[str | None, str | None]:
    """(the axis to scale along: depth, else the first numeric one; the axis tuned per point)."""
    numeric = [a for a in grid.axes if all(isinstance(v, (int, float, np.number)) for v in grid.values[a])]
    scale = "depth" if "depth" in grid.axes else (numeric[0] if numeric else None)
    if scale is None:
        return None, None
    tune = next((a for a in (grid.y_axis, grid.x_axis) if a and a != scale), None)
    return scale, tune


def best_settings(grid: Grid, rows: pd.DataFrame, scale: str, tune: str | None) -> pd.DataFrame:
    """Per scheme and scale value, the tuned value with the highest success rate, then fewest steps."""
    med = cell_medians(grid, rows, ["scheme", scale, *([tune] if tune else [])])
    med["success"] = med["n_reached"] / med["n"]
    med = med.sort_values(["success", "steps", "final_loss"], ascending=[False, True, True],
                          na_position="last")
    return med.drop_duplicates(["scheme", scale]).sort_values(["scheme", scale])


def depth_figure(grid: Grid) -> Figure:
    scale, tune = scale_axes(grid)
    title = f"Scaling with {scale or 'depth'}"
    if scale is None:
        return Figure(title, empty="no data: the grid has no numeric axis (such as depth) to scale along")
    runs = grid.runs[grid.runs["status"] != "failed"]
    if runs.empty:
        return Figure(title, empty="no data: every job failed")
    facets, note = grid.facets(limit=4)
    stops: list[dict] = []
    with style():
        fig = plt.figure(layout="constrained", figsize=(13, 3.9 * len(facets) + 0.4))
        subfigs = fig.subfigures(len(facets), 1, squeeze=False)[:, 0] if len(facets) > 1 else [fig]
        for sub, (facet, mask) in zip(subfigs, facets, strict=True):
            stops += _depth_row(sub.subplots(1, 3), grid, runs[mask.loc[runs.index]], scale, tune, facet)
            if facet:
                sub.suptitle(text(facet), fontsize=10.5, fontweight="bold", color="#444")
        stop_marker = plt.Line2D([], [], marker="X", ms=11, color="#999", mec="black", ls="none",
                                 label="stops training")
        legend(fig, grid, present(grid, runs["scheme"]), marker="o",
               more=[stop_marker])
        fig.suptitle(title, fontweight="bold")
    tuned = (f"At each {scale} every scheme uses its own best {tune} (highest success rate, then fewest "
             "median steps), listed in the table; " if tune else "")
    caption = (tuned + f"medians over seeds with bootstrap 95% CI bands. A scheme trains at a {scale} when "
               f"at least {TRAINS_AT:.0%} of its seeds reach the target; the X marks the first {scale} where "
               "it no longer does. Gaps in the steps panel are points whose median seed never reached the "
               "target. " + note)
    table = pd.DataFrame(stops).to_html(index=False, escape=True, border=0, classes="data")
    return Figure(title, caption, to_uri(fig), table=table)


def _depth_row(axes, grid: Grid, rows: pd.DataFrame, scale: str, tune: str | None, facet: str) -> list[dict]:
    """One facet's three panels (success, steps, final loss vs scale); returns its 'stops' table rows."""
    best = best_settings(grid, rows, scale, tune)
    keys = ["scheme", scale, *([tune] if tune else [])]
    chosen = rows.merge(best[keys], on=keys)
    stops = []
    for i, scheme in enumerate(present(grid, best["scheme"])):
        b = best[best["scheme"] == scheme]
        color, ls = grid.colors[scheme], LINESTYLES[i % len(LINESTYLES)]
        axes[0].plot(b[scale].to_numpy(dtype=float), b["success"], marker="o", color=color, ls=ls, lw=2)
        stop = _stop(b, scale)
        if stop is not None:
            axes[0].plot([stop], [float(b.loc[b[scale] == stop, "success"].iloc[0])], marker="X", ms=13,
                         color=color, mec="black", ls="none")
        mine = chosen[chosen["scheme"] == scheme]
        for ax, metric in ((axes[1], "steps"), (axes[2], "final_loss")):
            pairs = [(k, median_ci(g[metric].to_numpy(dtype=float))) for k, g in mine.groupby(scale)]
            gx = np.array([k for k, _ in pairs], dtype=float)
            stats = np.array([v for _, v in pairs], dtype=float).reshape(-1, 3)
            stats[~np.isfinite(stats)] = np.nan  # "never" is not drawn: the success panel shows it
            ax.plot(gx, stats[:, 0], marker="o", color=color, ls=ls, lw=2)
            ax.fill_between(gx, stats[:, 1], stats[:, 2], color=color, alpha=0.15, lw=0)
        tuned = {f"best {tune} per {scale}": ", ".join(f"{fmt(d)}: {fmt(v)}" for d, v in
                                                        zip(b[scale], b[tune], strict=True))} if tune else {}
        stops.append({**({"setting": facet} if facet else {}), "scheme": scheme,
                      f"stops training at {scale}": _stop_text(b, scale, stop), **tuned})
    axes[0].set(title="success rate", ylabel="fraction of seeds reaching target", ylim=(-0.05, 1.05))
    axes[1].set(title="steps to target", ylabel="median steps (95% CI over seeds)")
    axes[2].set(title="final train loss", ylabel="median loss (log scale)")
    values = [float(v) for v in grid.values[scale]]
    for ax in axes:
        ax.set_xlabel(label(scale) + (" (log scale)" if scale in ("depth", "width", "lr") else ""))
        if scale in ("depth", "width", "lr") and min(values) > 0:
            ax.set_xscale("log", base=10 if scale == "lr" else 2)
            ax.set_xlim(min(values) / 1.2, max(values) * 1.2)
            ax.set_xticks(values, [fmt(v) for v in grid.values[scale]])
            ax.minorticks_off()
    for ax, what in ((axes[1], "no median seed reached the target"), (axes[2], "no finite final loss")):
        if not any(np.isfinite(line.get_ydata()).any() for line in ax.get_lines()):
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="#666")
            ax.set_yticks([])
        elif ax is axes[2]:
            ax.set_yscale("log")
            log_ticks(ax.yaxis)
    return stops


def _stop(best: pd.DataFrame, scale: str):
    """The first scale value where a scheme stops training, after training at a smaller one."""
    trains = best["success"].to_numpy() >= TRAINS_AT
    values = best[scale].to_numpy()
    if trains.all() or not trains.any():
        return values[0] if not trains.any() else None
    first_ok = int(np.argmax(trains))
    failing = np.flatnonzero(~trains[first_ok:])
    return values[first_ok + failing[0]] if len(failing) else None


def _stop_text(best: pd.DataFrame, scale: str, stop) -> str:
    trains = best["success"].to_numpy() >= TRAINS_AT
    if stop is None:
        return f"trains at every {scale} tried"
    if not trains.any():
        return f"never trains (not even at {fmt(best[scale].iloc[0])})"
    return fmt(stop)


# --- learning curves --------------------------------------------------------------
def curve_cells(grid: Grid) -> tuple[list[dict], str]:
    """A few cells to show curves for: smallest, middle and largest y_axis value at the best x_axis value."""
    runs = grid.runs[grid.runs["status"] != "failed"]
    mask, note = grid.reference_mask()
    runs = runs[mask.loc[runs.index]]
    fixed = dict(grid.reference)
    if grid.x_axis:
        med = cell_medians(grid, runs, [grid.x_axis])
        med["success"] = med["n_reached"] / med["n"]
        top = med.sort_values(["success", "steps", "final_loss"], ascending=[False, True, True]).iloc[0]
        fixed[grid.x_axis] = top[grid.x_axis]
        note += (f" {grid.x_axis}={fmt(top[grid.x_axis])}: the value with the highest success rate over all "
                 f"schemes and {grid.y_axis} values.")
    if not grid.y_axis:
        return [fixed], note
    ys = grid.values[grid.y_axis]
    picks = list(dict.fromkeys([ys[0], ys[len(ys) // 2], ys[-1]]))
    return [{**fixed, grid.y_axis: y} for y in picks], note


def curves_figure(grid: Grid, curves: pd.DataFrame) -> Figure:
    title = "Learning curves"
    runs = grid.runs[grid.runs["status"] != "failed"]
    if runs.empty or curves.empty:
        return Figure(title, empty="no data: no job logged a learning curve")
    cells, note = curve_cells(grid)
    drawn, any_diverged = False, False
    with style():
        fig, axes = plt.subplots(1, len(cells), figsize=(4.4 * len(cells) + 1.6, 3.9), squeeze=False,
                                 sharey=True, layout="constrained")
        for ax, cell in zip(axes[0], cells, strict=True):
            sel = runs.loc[match(runs, cell), ["job_id", "scheme", "status"]]
            cur = curves[curves["job_id"].isin(sel["job_id"])].merge(sel, on="job_id")
            # Log scale: a loss that is not a positive finite number (a net that overflowed at
            # step 0) has no place on it; the x of its seed's divergence is drawn where it can be.
            cur = cur[np.isfinite(cur["train_loss"]) & (cur["train_loss"] > 0)]
            agg = quartiles(cur, ["scheme", "step"], "train_loss")
            ends = cur[cur["status"] == "diverged"].groupby("job_id").tail(1)
            for i, scheme in enumerate(grid.schemes):
                a = agg[agg["scheme"] == scheme]
                if a.empty:
                    continue
                drawn = True
                color = grid.colors[scheme]
                ax.plot(a["step"], a["median"], color=color, lw=2, ls=LINESTYLES[i % len(LINESTYLES)])
                ax.fill_between(a["step"], a["low"], a["high"], color=color, alpha=0.15, lw=0)
                e = ends[ends["scheme"] == scheme]
                ax.plot(e["step"], e["train_loss"], "x", color=color, ms=8, mew=2)
                any_diverged |= not e.empty
            shown = {k: v for k, v in cell.items() if k in (grid.y_axis, grid.x_axis)}
            ax.set_title(text(Grid.describe(shown) or "all runs"))
            ax.set_xlabel("training step")
        if not drawn:
            plt.close(fig)
            return Figure(title, empty="no data: the selected cells have no logged losses")
        axes[0, 0].set_yscale("log")
        axes[0, 0].set_ylabel("train loss (log scale)")
        log_ticks(axes[0, 0].yaxis)
        diverged = [plt.Line2D([], [], marker="x", ms=8, mew=2, color="#555", ls="none",
                               label="seed diverged")] if any_diverged else []
        legend(fig, grid, present(grid, runs["scheme"]), more=diverged)
        fig.suptitle(title, fontweight="bold")
    caption = ("Train loss (mean minibatch loss per logging window) against step: the line is the median "
               "over seeds, the band their interquartile range (25% to 75%); x marks where a seed diverged "
               "(its curve stops there, so later medians are over the seeds still training)." + note)
    return Figure(title, caption, to_uri(fig))
