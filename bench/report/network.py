"""Figures from the per-layer probes: signal propagation at init, and parameter trajectories."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from bench.report.figures import (
    LINESTYLES,
    Figure,
    legend,
    log_ticks,
    plt,
    positive_floor,
    present,
    style,
    text,
    to_uri,
)
from bench.report.grid import Grid, fmt, match, quartiles
from bench.report.training import curve_cells

INDEX_LABEL = "module index (forward order, 0 = first)"


def _deepest(grid: Grid, runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Runs of the deepest network at the reference extras (signal propagation is clearest there)."""
    mask, note = grid.reference_mask()
    runs = runs[mask.loc[runs.index]]
    if "depth" in runs and runs["depth"].nunique() > 1:
        deepest = runs["depth"].max()
        runs = runs[runs["depth"] == deepest]
        note = f" Deepest network in the grid (depth={fmt(deepest)})." + note
    return runs, note


def _log_axis(ax, values: np.ndarray, floor: float) -> None:
    """Log-scale the y axis with zeros on the dotted ``floor``; a note instead when nothing is finite."""
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).any():  # e.g. every gradient NaN: a net that overflowed at step 0
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes,
                color="#666")
        ax.set_yticks([])
        return
    ax.set_yscale("log")
    log_ticks(ax.yaxis)
    if (values <= floor).any():
        ax.axhline(floor, color="#888", lw=0.8, ls=":")
        ax.annotate("exactly 0", (1.0, floor), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=7, color="#555")


def propagation_figure(grid: Grid, layers: pd.DataFrame) -> Figure:
    title = "Signal propagation at initialization"
    runs = grid.runs[grid.runs["status"] != "failed"]
    if runs.empty or layers.empty:
        return Figure(title, empty="no data: no job recorded per-layer statistics")
    runs, note = _deepest(grid, runs)
    first = layers[layers["step"] == layers["step"].min()]  # before isin: a 30th of the rows to match
    step0 = first[first["job_id"].isin(runs["job_id"])]
    panels = (("act", "std", "activation std (hidden layers)", "std of post-activation output"),
              ("weight", "grad_norm", "weight-gradient norm", "gradient norm of weight"))
    data = step0[step0["param"].isin(["act", "weight"])].merge(runs[["job_id", "scheme"]], on="job_id")
    if data.empty:
        return Figure(title, empty="no data: no step-0 layer statistics for the selected runs")
    # Theory's rows: an MLP's preactivations, a residual MLP's stem, stream and head (q_pred set).
    predicted = step0["q_pred"].notna() if "q_pred" in step0 else False
    theory = step0[(step0["param"] == "preact") | predicted].merge(runs[["job_id", "scheme"]], on="job_id")
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
        _theory_panel(axes[2], grid, theory)
        for ax, (param, stat, name, ylabel) in zip(axes[:2], panels, strict=True):
            d = data[data["param"] == param]
            agg = quartiles(d, ["scheme", "index"], stat)
            floor = positive_floor(agg[["median", "low", "high"]].to_numpy())
            for col in ("median", "low", "high"):
                agg[col] = agg[col].clip(lower=floor)
            for i, scheme in enumerate(grid.schemes):
                a = agg[agg["scheme"] == scheme]
                if a.empty:
                    continue
                color = grid.colors[scheme]
                ax.plot(a["index"], a["median"], marker="o", ms=4, lw=2, color=color,
                        ls=LINESTYLES[i % len(LINESTYLES)], label=text(scheme))
                ax.fill_between(a["index"], a["low"], a["high"], color=color, alpha=0.15, lw=0)
            _log_axis(ax, agg["median"].to_numpy(), floor)
            ax.set(title=name, xlabel=INDEX_LABEL, ylabel=f"{ylabel} (log scale)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(-0.4, max(int(agg["index"].max()) if len(agg) else 0, 1) + 0.4)
        legend(fig, grid, present(grid, data["scheme"]), marker="o")
        fig.suptitle(title, fontweight="bold")
    caption = ("Step 0, before any update: left, the standard deviation of each hidden layer's output "
               "(after the activation); right, the norm of each linear layer's weight gradient on the first "
               "batch. A well-scaled init keeps both flat across layers; a downward slope is vanishing "
               "signal, upward exploding. Lines are medians over all runs of the cell (learning rate does "
               "not matter at step 0; seeds do), bands their interquartile range. Values that are exactly "
               "zero sit on the dotted floor. Third panel: each layer's preactivation second moment q "
               "(a residual MLP's stem, stream after each block and head) (points, median over runs) beside "
               "mean-field theory's prediction for the scheme, the "
               "activation and the measured input (lines; bench.theory): agreement means the init does "
               "what its formula promises. Theory describes the average network; a single finite-width "
               "net drifts from it by a few tens of percent over many layers. x: each module's position in "
               "the forward pass (in an MLP, linear layer i is module 2i and its activation 2i + 1)."
               + note)
    return Figure(title, caption, to_uri(fig))


def _theory_panel(ax, grid: Grid, preact: pd.DataFrame) -> None:
    """Measured preactivation second moment (points) against mean-field theory (lines), per scheme."""
    ax.set(title="signal vs mean-field theory", xlabel=INDEX_LABEL,
           ylabel="preactivation (resmlp: stream) q (log scale)")
    if preact.empty or "q_pred" not in preact or preact["q_pred"].isna().all():
        ax.text(0.5, 0.5, "no theory prediction stored: theory covers MLPs\nand the built-in resmlp "
                "(stores written since)",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#555")
        return
    agg = preact.groupby(["scheme", "index"])[["q", "q_pred"]].median().reset_index()
    floor = positive_floor(agg[["q", "q_pred"]].to_numpy())
    for i, scheme in enumerate(grid.schemes):
        a = agg[agg["scheme"] == scheme]
        if a.empty:
            continue
        color = grid.colors[scheme]
        ax.plot(a["index"], a["q_pred"].clip(lower=floor), lw=1.5, color=color,
                ls=LINESTYLES[i % len(LINESTYLES)], label=f"{text(scheme)} (theory)")
        ax.plot(a["index"], a["q"].clip(lower=floor), ls="none", marker="o", ms=4, color=color)
    _log_axis(ax, agg["q"].to_numpy(), floor)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot([], [], ls="none", marker="o", color="#444", label="measured")
    ax.plot([], [], ls="-", color="#444", label="theory")
    handles, labels = ax.get_legend_handles_labels()
    keep = [(h, lab) for h, lab in zip(handles, labels) if lab in ("measured", "theory")]
    ax.legend(*zip(*keep), loc="best", fontsize=8, frameon=False)


def trajectory_figure(grid: Grid, layers: pd.DataFrame) -> Figure:
    title = "Parameter trajectories during training"
    runs = grid.runs[grid.runs["status"] != "failed"]
    if runs.empty or layers.empty:
        return Figure(title, empty="no data: no job recorded per-layer statistics")
    runs, note = _deepest(grid, runs)
    cells, _ = curve_cells(grid)
    cell = {k: v for k, v in cells[-1].items() if k != "depth" and k in runs}
    runs = runs[match(runs, cell)]
    if cell:
        note += f" Cell: {Grid.describe(cell)} (the learning curves' best value)."
    data = layers[layers["job_id"].isin(runs["job_id"]) & layers["param"].isin(["weight", "bias"])]
    data = data.merge(runs[["job_id", "scheme"]], on="job_id")
    if data.empty:
        return Figure(title, empty="no data: no layer statistics for the selected cell")
    held = sorted(data["index"].unique())  # the parameter-holding modules, in forward order
    picks = list(dict.fromkeys([held[0], held[len(held) // 2], held[-1]]))
    names = dict(zip(picks, ["first layer", "middle layer", "last layer"][:len(picks)]))
    if len(picks) == 2:
        names[picks[1]] = "last layer"
    data = data[data["index"].isin(picks)]
    # observed=True: param is categorical (bench.load); only the weight and bias groups exist here
    agg = data.groupby(["param", "index", "scheme", "step"], observed=True)[["mean", "std", "norm"]] \
        .median().reset_index()
    with style():
        fig, axes = plt.subplots(2, 3, figsize=(13, 6.6), layout="constrained")
        for r, param in enumerate(("weight", "bias")):
            for c, stat in enumerate(("mean", "std", "norm")):
                ax = axes[r, c]
                sub = agg[agg["param"] == param]
                floor = positive_floor(sub[stat].to_numpy()) if stat != "mean" else None
                for scheme in grid.schemes:
                    for k, layer in enumerate(picks):
                        a = sub[(sub["scheme"] == scheme) & (sub["index"] == layer)]
                        if a.empty:
                            continue
                        y = a[stat] if floor is None else a[stat].clip(lower=floor)
                        ax.plot(a["step"], y, color=grid.colors[scheme], lw=1.8, ls=LINESTYLES[k])
                if floor is not None:
                    _log_axis(ax, sub[stat].to_numpy(), floor)
                scale = " (log scale)" if floor is not None else ""
                ax.set(title=f"{param} {stat}", xlabel="training step", ylabel=f"{param} {stat}{scale}")
        handles = [plt.Line2D([], [], color=grid.colors[s], lw=2.5, label=text(s))
                   for s in present(grid, agg["scheme"])]
        handles += [plt.Line2D([], [], color="#333", lw=1.8, ls=LINESTYLES[k], label=names[layer])
                    for k, layer in enumerate(picks)]
        fig.legend(handles=handles, loc="outside right center", title="scheme / layer", fontsize=8)
        fig.suptitle(title, fontweight="bold")
    caption = ("Mean, standard deviation and norm of the weights (top) and biases (bottom) of the first, "
               "middle and last linear layer at each logged step, median over seeds; colour is the scheme, "
               "line style the layer. Growing norms point to exploding weights; a std stuck at zero to "
               "symmetry that never breaks (as with zeros init)." + note)
    return Figure(title, caption, to_uri(fig))
