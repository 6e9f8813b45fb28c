"""Figures from the per-layer probes: signal propagation at init, parameter trajectories, and the
coordinate check along a width axis.

A model with more than :data:`MANY_MODULES` probed modules (a 64-block transformer has over 500)
and residual blocks (``blocks.<i>``, see bench.train.architectures) is drawn per block: the
residual stream after each block and each block's total, with the per-module numbers in a table
folded under the figure. Smaller models are drawn per module.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from bench import schema
from bench.report import coord
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
from bench.report.tables import html
from bench.report.training import curve_cells

INDEX_LABEL = "module index (forward order, 0 = first)"
BLOCK_LABEL = "residual block (forward order, 0 = first)"
MANY_MODULES = 40  # above this many modules, per-module lines are unreadable: draw per block
LEGEND_MODULES = 20  # up to this many lines get a legend entry each; more are coloured by position


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
    if _per_block(step0):
        return _block_propagation(grid, step0.merge(runs[["job_id", "scheme"]], on="job_id"), note)
    # Theory's rows: an MLP's preactivations, a residual MLP's stem, stream and head (q_pred set).
    predicted = step0["q_pred"].notna() if "q_pred" in step0 else False
    theory = step0[(step0["param"] == "preact") | predicted].merge(runs[["job_id", "scheme"]], on="job_id")
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
        _theory_panel(axes[2], grid, theory)
        for ax, (param, stat, name, ylabel) in zip(axes[:2], panels, strict=True):
            _median_panel(ax, grid, data[data["param"] == param], "index", stat)
            ax.set(title=name, xlabel=INDEX_LABEL, ylabel=f"{ylabel} (log scale)")
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


def _median_panel(ax, grid: Grid, data: pd.DataFrame, x: str, stat: str) -> None:
    """Per scheme, the median of ``stat`` over runs against ``x`` (log y), with an interquartile band."""
    agg = quartiles(data, ["scheme", x], stat)
    floor = positive_floor(agg[["median", "low", "high"]].to_numpy())
    for col in ("median", "low", "high"):
        agg[col] = agg[col].clip(lower=floor)
    for i, scheme in enumerate(grid.schemes):
        a = agg[agg["scheme"] == scheme]
        if a.empty:
            continue
        color = grid.colors[scheme]
        ax.plot(a[x], a["median"], marker="o", ms=4, lw=2, color=color,
                ls=LINESTYLES[i % len(LINESTYLES)], label=text(scheme))
        ax.fill_between(a[x], a["low"], a["high"], color=color, alpha=0.15, lw=0)
    _log_axis(ax, agg["median"].to_numpy(), floor)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.4, max(int(agg[x].max()) if len(agg) else 0, 1) + 0.4)


def _per_block(step0: pd.DataFrame) -> bool:
    """Too many modules for a line per module, and residual blocks to summarize them by."""
    names = pd.Series(step0["layer"].unique()).astype(str)
    return len(names) > MANY_MODULES and names.str.fullmatch(schema.BLOCK).any()


def _block_propagation(grid: Grid, step0: pd.DataFrame, note: str) -> Figure:
    """The propagation figure of a deep residual model: per block, not per module."""
    title = "Signal propagation at initialization"
    names = step0["layer"].astype(str)
    step0 = step0.assign(block=coord.block_number(names).to_numpy())
    stream = step0[(step0["param"] == "output") & names.str.fullmatch(schema.BLOCK).to_numpy()]
    weights = step0[(step0["param"] == "weight") & step0["block"].notna()]
    # A block's gradient norm is the norm of all its weights' gradients together: sqrt of the sum of squares.
    squares = weights.assign(sq=weights["grad_norm"].astype(float) ** 2)
    grads = squares.groupby(["job_id", "scheme", "block"], observed=True)["sq"].sum(min_count=1)
    grads = np.sqrt(grads).rename("grad_norm").reset_index()
    panels = ((stream, "std", "residual stream std after each block", "std of the block's output"),
              (grads, "grad_norm", "weight-gradient norm per block", "norm of the block's weight gradients"))
    # The residual MLP's stream has a prediction (bench.theory.stream_variance): drawn per block too.
    theory = stream[stream["q_pred"].notna()] if "q_pred" in stream else stream.iloc[:0]
    with style():
        fig, axes = plt.subplots(1, 3 if len(theory) else 2, figsize=(16 if len(theory) else 11, 4),
                                 layout="constrained")
        for ax, (data, stat, name, ylabel) in zip(axes, panels):
            _median_panel(ax, grid, data, "block", stat)
            ax.set(title=name, xlabel=BLOCK_LABEL, ylabel=f"{ylabel} (log scale)")
        if len(theory):
            _theory_panel(axes[2], grid, theory.assign(index=theory["block"]))
            axes[2].set(title="residual stream q vs theory", xlabel=BLOCK_LABEL,
                        ylabel="second moment q of the stream (log scale)")
        legend(fig, grid, present(grid, step0["scheme"]), marker="o")
        fig.suptitle(title, fontweight="bold")
    n = step0["layer"].nunique()
    caption = (f"Step 0, before any update, drawn per residual block: the model has {n} probed modules, "
               "too many for a line each. Left, the standard deviation of the residual stream after each "
               "block (the output of blocks.i); right, the norm of each block's weight gradients on the "
               "first batch (all its weights together). A well-scaled init keeps both flat across blocks; "
               "an upward slope in the stream is the variance every branch adds. Lines are medians over "
               "all runs of the cell, bands their interquartile range. Modules outside the blocks "
               "(embeddings, final norm, head) and the per-module numbers are in the table below."
               + (" For the residual MLP, a third panel sets the stream's measured second moment q (points) "
                  "against its step-0 prediction (lines: each block adds its branch's variance)."
                  if len(theory) else "") + note)
    return Figure(title, caption, to_uri(fig), details=_module_table(step0),
                  details_summary=f"Per-module numbers at step 0 ({n} modules, medians over runs)")


def _module_table(step0: pd.DataFrame) -> str:
    """Per module in forward order and per scheme: output std and weight-gradient norm at step 0."""
    keys = ["index", "layer", "scheme"]
    out = step0[step0["param"].isin(["output", "act"])].groupby(keys, observed=True)["std"].median()
    grad = step0[step0["param"] == "weight"].groupby(keys, observed=True)["grad_norm"].median()
    table = pd.concat({"output std": out, "weight-gradient norm": grad}, axis=1).unstack("scheme")
    table.columns = [f"{scheme}: {what}" for what, scheme in table.columns]
    table = table.map(lambda v: "—" if not np.isfinite(v) else f"{v:.3g}")
    return html(table.reset_index().rename(columns={"layer": "module"}))


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


# --- the coordinate check along a width axis ------------------------------------------
def coord_section(grid: Grid, layers: pd.DataFrame) -> dict | None:
    """The coordinate check of a sweep with a width axis (None without one, or with a single width).

    Returns the figure (one row of panels per scheme, one panel per early logged step, a line per
    module), ``summary`` (HTML: per scheme, the modules whose size grows with width), ``flags``
    (the flagged schemes' rows of it, for the pathologies section) and ``modules`` (HTML: per
    scheme and module, the slope at each step and the flag), folded unless the model is small.
    """
    if "width" not in grid.axes or len(grid.values["width"]) < 2:
        return None
    title = "Coordinate check: module output size against width"
    runs = grid.runs[grid.runs["status"] != "failed"]
    mask, note = grid.along("width")
    runs = runs[mask.loc[runs.index]]
    probes = layers[layers["param"].isin(["output", "act"])]
    sized = coord.sizes(probes[probes["job_id"].isin(runs["job_id"])], runs, "scheme")
    empty = {"summary": "", "flags": [], "modules": "", "open": False, "n_modules": 0}
    if sized.empty:
        return {**empty, "figure": Figure(title, empty="no data: no job recorded module outputs")}
    steps = coord.first_steps(sized)
    sized = sized[sized["step"].isin(steps)]
    rank = {s: i for i, s in enumerate(grid.schemes)}
    sized = sized.sort_values(["scheme", "step", "index", "width"], key=lambda c: c.map(rank) if
                              c.name == "scheme" else c, kind="stable")
    slopes = coord.slopes(sized, "scheme")
    if slopes.empty:
        return {**empty, "figure": Figure(title, empty="no data: fewer than two widths with finite sizes")}
    many = sized["module"].nunique() > MANY_MODULES
    shown = sized[coord.top_level(sized["module"]).to_numpy()] if many else sized
    summary = coord.scheme_flags(slopes)
    flagged = summary[summary["flag"] != ""]
    fig = _coord_figure(grid, shown, steps)
    which = ("the residual stream (blocks.i) and the modules outside the blocks; every module's slope is in "
             "the table" if many else "every probed module")
    caption = (f"The mup package's coordinate check: each module's output size (the RMS of its entries, "
               f"mean over seeds) against width on log-log axes, at step 0 and the next logged steps; a line "
               f"per module ({which}). A width-stable parametrization keeps every line flat; a line that "
               f"rises grows with width (the table fits its log-log slope and flags it above "
               f"{coord.SLOPE_MAX:g}, i.e. faster than width^{coord.SLOPE_MAX:g}). Under the standard "
               "parametrization the output typically rises after one update, while step 0 is flat." + note)
    summary_html = html(summary.assign(**{"max slope": summary["max slope"].map(_slope)}))
    table = coord.wide(slopes)
    table = table.assign(**{c: table[c].map(_slope) for c in table.columns if c.startswith("slope")})
    return {"figure": Figure(title, caption, fig), "summary": summary_html, "modules": html(table),
            "open": not many, "flags": flagged.to_dict("records"),
            "n_modules": int(slopes["module"].nunique())}


def _slope(value: float) -> str:
    # + 0.0 turns the -0.0 of a rounded -1e-17 (a flat module's fit) into 0.0: "+0.00", not "-0.00"
    return "—" if not np.isfinite(value) else f"{round(value, 2) + 0.0:+.2f}"


def _coord_figure(grid: Grid, sized: pd.DataFrame, steps: list[int]) -> str:
    schemes = present(grid, sized["scheme"])
    modules = sized.drop_duplicates("module").sort_values("index")["module"].tolist()
    widths = sorted(float(w) for w in sized["width"].unique())
    many = len(modules) > LEGEND_MODULES
    cmap = plt.cm.viridis if many else plt.cm.tab20  # many: colour says position, not name
    colors = {m: cmap(i / max(len(modules) - 1, 1)) if many else cmap(i % 20) for i, m in enumerate(modules)}
    with style():
        size = (3.1 * len(steps) + 2.2, 2.8 * len(schemes))
        fig, axes = plt.subplots(len(schemes), len(steps), figsize=size, squeeze=False, sharex=True,
                                 layout="constrained")
        for r, scheme in enumerate(schemes):
            for c, step in enumerate(steps):
                ax = axes[r, c]
                cell = sized[(sized["scheme"] == scheme) & (sized["step"] == step)]
                for module, group in cell.groupby("module", sort=False):
                    y = group["size"].where(group["size"] > 0)  # a zero readout has no place on log axes
                    ax.plot(group["width"], y, marker=".", lw=1.2, color=colors[module], label=text(module))
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                log_ticks(ax.yaxis)
                ax.set_xticks(widths, [fmt(w) for w in widths])
                ax.minorticks_off()
                ax.set_title(f"{text(scheme)}, step {step}", fontsize=9.5)
                if r == len(schemes) - 1:
                    ax.set_xlabel("width (log scale)")
                if c == 0:
                    ax.set_ylabel("output RMS (log scale)")
        if many:
            bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=axes, shrink=0.8, ticks=[0, 1])
            bar.ax.set_yticklabels([text(modules[0]), text(modules[-1])])
            bar.set_label("module, forward order")
        else:
            handles = [plt.Line2D([], [], color=colors[m], marker=".", lw=1.2, label=text(m))
                       for m in modules]
            fig.legend(handles=handles, loc="outside right upper", title="module", fontsize=8)
        fig.suptitle("Coordinate check (mup's): each module's output size against width", fontweight="bold")
    return to_uri(fig)
