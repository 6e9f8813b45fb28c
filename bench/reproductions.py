"""Paper reproductions: the numbers and figures of docs/reproductions.md, from the shipped sweeps' stores.

``python -m bench.reproductions DIR... [--out docs/figures]`` reads each sweep directory, tells from
its spec name which reproduction it holds (``he2015``, ``glorot2010``, ``edge_of_chaos``,
``saxe2013``, ``blog``: the sweeps of the same names under ``sweeps/``), writes ``<name>.png`` under
``--out`` and prints the reproduction's numbers as markdown tables. Rerunning it after rerunning the
sweeps regenerates every figure and number in the doc.

The analysis functions (``he_table``, ``glorot_profile``, ``eoc_grid``, ``saxe_times``, ...) are
what tests/test_reproductions.py checks on scaled-down runs, so the doc and the tests read the
results the same way.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bench import cli
from bench.errors import EXIT_OK, UserError
from bench.report import coord

FIG_DPI = 100  # keeps every PNG well under 300 KB


# --- helpers ---------------------------------------------------------------------
def markdown(df: pd.DataFrame, floatfmt: str = ".3g") -> str:
    """A DataFrame as a GitHub markdown table (index dropped; NaN printed as '-')."""
    def cell(v: object) -> str:
        if isinstance(v, (float, np.floating)):
            return "-" if not np.isfinite(v) else format(float(v), floatfmt)
        return str(v)

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _dims(run: pd.Series) -> list[int]:
    """Layer widths [d_in, width, ..., d_out] of a run's MLP (the task's data gives d_in, d_out)."""
    from bench.train import models, tasks

    # .item(): pandas hands back numpy scalars, which torch.Generator.manual_seed refuses
    params = tuple(sorted((k[5:], v.item() if hasattr(v, "item") else v) for k, v in run.items()
                          if k.startswith("task.") and pd.notna(v)))
    data = tasks.load(run["task"], params, int(run["seed"]))
    return models.layer_dims(data.d_in, data.d_out, int(run["depth"]), int(run["width"]))


def _step0(results, param: str) -> pd.DataFrame:
    layers = results.layers
    rows = layers[(layers["step"] == 0) & (layers["param"] == param)]
    # The MLP's linear layer i is module 2i and its activation module 2i + 1: the layer's ordinal.
    rows = rows.assign(layer=rows["index"] // 2)
    return rows.merge(results.runs.drop(columns=["status", "error"], errors="ignore"), on="job_id")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIG_DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# --- He et al. 2015 --------------------------------------------------------------
def he_table(results) -> pd.DataFrame:
    """Per (init, depth): seeds, val accuracy (mean, min, max), final/initial train loss, stalled runs."""
    runs = results.runs.assign(loss_ratio=lambda r: r["final_loss"] / r["initial_loss"],
                               stalled=lambda r: r["pathologies"].str.contains("stalled"))
    return (runs.groupby(["depth", "init"], sort=True)
            .agg(seeds=("seed", "count"), val_acc_mean=("final_val_acc", "mean"),
                 val_acc_min=("final_val_acc", "min"), val_acc_max=("final_val_acc", "max"),
                 loss_ratio_mean=("loss_ratio", "mean"), stalled=("stalled", "sum"),
                 steps_to_target_median=("steps_to_target", "median"))
            .reset_index())


def he_figure(results, path: Path) -> Path:
    """Train loss and val accuracy over steps, one panel column per depth, one line per run."""
    plt = _pyplot()
    runs, curves = results.runs, results.curves.merge(results.runs[["job_id", "init", "depth"]], on="job_id")
    depths = sorted(runs["depth"].unique())
    inits = sorted(runs["init"].unique())
    colors = dict(zip(inits, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    fig, axes = plt.subplots(2, len(depths), figsize=(4.2 * len(depths), 5.6), sharex=True, squeeze=False)
    for j, depth in enumerate(depths):
        labelled: set[str] = set()
        for _, c in curves[curves["depth"] == depth].groupby("job_id"):
            init = c["init"].iloc[0]
            label = None if init in labelled else init
            labelled.add(init)
            axes[0, j].plot(c["step"], c["train_loss"], color=colors[init], alpha=0.8, label=label)
            axes[1, j].plot(c["step"], c["val_acc"], color=colors[init], alpha=0.8)
        axes[0, j].axhline(math.log(10), color="grey", ls="--", lw=1, label="chance (ln 10)")
        axes[1, j].axhline(0.1, color="grey", ls="--", lw=1)
        axes[0, j].set_title(f"{depth}-layer ReLU MLP, width {int(runs['width'].iloc[0])}")
        axes[0, j].set_ylabel("train loss")
        axes[1, j].set_ylabel("val accuracy")
        axes[1, j].set_xlabel("SGD step")
        axes[1, j].set_ylim(0, 1)
    axes[0, 0].legend(loc="lower left", fontsize=8)
    fig.suptitle("He et al. 2015, Fig. 3: Xavier (var 1/n) vs Kaiming (var 2/n) on digits", fontsize=10)
    return _save(fig, path)


# --- Glorot & Bengio 2010 --------------------------------------------------------
def glorot_profile(results) -> pd.DataFrame:
    """Per (init, layer) at step 0, averaged over seeds: what Glorot & Bengio's Figs. 6-8 histogram.

    Columns: ``act_std`` (the layer's tanh outputs), ``backprop_grad`` (RMS over units of the bias
    gradient, i.e. of dLoss/d preactivation averaged over the batch: the back-propagated gradient),
    ``weight_grad`` (RMS over entries of the weight gradient into the layer). Layers are 1-based and
    hidden only (1 = the first hidden layer, fed by the input), as in the paper's figures.
    """
    run0 = results.runs.iloc[0]
    dims = _dims(run0)
    numel_w = {i: dims[i] * dims[i + 1] for i in range(len(dims) - 1)}
    act = _step0(results, "act").groupby(["init", "layer"])["std"].mean().rename("act_std")
    bias = _step0(results, "bias").assign(rms=lambda d: d["grad_norm"] / np.sqrt(d["layer"].map(
        lambda i: dims[i + 1])))
    weight = _step0(results, "weight").assign(rms=lambda d: d["grad_norm"] / np.sqrt(d["layer"].map(numel_w)))
    out = pd.concat([act, bias.groupby(["init", "layer"])["rms"].mean().rename("backprop_grad"),
                     weight.groupby(["init", "layer"])["rms"].mean().rename("weight_grad")], axis=1)
    out = out.reset_index()
    # The paper's figures show the hidden layers only: the output layer's dL/dz (softmax minus
    # one-hot) is another kind of gradient, over 10 units instead of the width.
    out = out[out["layer"] < len(dims) - 2].copy()
    out["layer"] += 1
    return out.reset_index(drop=True)


def glorot_table(results) -> pd.DataFrame:
    """Per init: across-layer spreads of glorot_profile, plus steps to target and final val accuracy."""
    prof = glorot_profile(results)
    rows = []
    for init, p in prof.groupby("init"):
        act = p["act_std"].dropna().to_numpy()
        runs = results.runs[results.runs["init"] == init]
        rows.append({"init": init, "act_std_first": act[0], "act_std_last": act[-1],
                     "act_last/first": act[-1] / act[0],
                     "backprop_grad_max/min": p["backprop_grad"].max() / p["backprop_grad"].min(),
                     "weight_grad_max/min": p["weight_grad"].max() / p["weight_grad"].min(),
                     "steps_to_target_median": runs["steps_to_target"].median(),
                     "val_acc_mean": runs["final_val_acc"].mean()})
    return pd.DataFrame(rows)


def glorot_figure(results, path: Path) -> Path:
    """Per-layer activation std, back-propagated and weight gradients at step 0; training curves."""
    plt = _pyplot()
    prof = glorot_profile(results)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    panels = [("act_std", "activation std (tanh output)", False),
              ("backprop_grad", "back-propagated gradient RMS (dL/db)", True),
              ("weight_grad", "weight-gradient RMS (dL/dW)", True)]
    for ax, (col, title, log) in zip(axes.flat, panels):
        for init, p in prof.groupby("init"):
            p = p.dropna(subset=[col])
            ax.plot(p["layer"], p[col], marker="o", label=init)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("hidden layer (1 = next to the input)")
        ax.set_xticks(sorted(prof["layer"].unique()))
        if log:
            ax.set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    ax = axes[1, 1]
    curves = results.curves.merge(results.runs[["job_id", "init"]], on="job_id")
    for init, c in curves.groupby("init"):
        med = c.groupby("step")["train_loss"].median()
        ax.plot(med.index, med.to_numpy(), label=init)
    ax.set_yscale("log")
    ax.set_title("train loss (median over seeds)", fontsize=9)
    ax.set_xlabel("SGD step")
    run0 = results.runs.iloc[0]
    fig.suptitle(f"Glorot & Bengio 2010, Figs. 6-8: {int(run0['depth']) - 1} tanh hidden layers of "
                 f"{int(run0['width'])}, step 0: default = U(+-1/sqrt(n)), biases 0", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --- Schoenholz et al. 2017 -------------------------------------------------------
def eoc_theory(sigma_w2: Sequence[float], sigma_b2: float, activation: str = "tanh") -> pd.DataFrame:
    """chi1, xi_c and 6 xi_c from mean-field theory for each sigma_w2."""
    from bench import theory

    rows = []
    for s in sigma_w2:
        _, xi_c = theory.depth_scales(activation, float(s), sigma_b2)
        rows.append({"sigma_w2": float(s), "chi1": theory.chi1(activation, float(s), sigma_b2),
                     "xi_c": xi_c, "6 xi_c": 6 * xi_c})
    return pd.DataFrame(rows)


def eoc_grid(results, metric: str = "final_val_acc") -> pd.DataFrame:
    """``metric`` as a depth x sigma_w2 table (mean over seeds)."""
    return results.runs.pivot_table(index="depth", columns="init.sigma_w2", values=metric, aggfunc="mean")


def eoc_agreement(results, threshold: float = 0.5) -> dict[str, float]:
    """How often "trained" (val accuracy >= threshold) matches theory's "depth <= 6 xi_c"."""
    runs = results.runs
    sigma_b2 = float(runs["init.sigma_b2"].iloc[0])
    theory_xi = eoc_theory(sorted(runs["init.sigma_w2"].unique()), sigma_b2).set_index("sigma_w2")["xi_c"]
    trained = runs["final_val_acc"] >= threshold
    predicted = runs["depth"] <= 6 * runs["init.sigma_w2"].map(theory_xi)
    return {"cells": float(len(runs)), "agree": float((trained == predicted).mean()),
            "trained_beyond_6xi": float((trained & ~predicted).sum()),
            "failed_within_6xi": float((~trained & predicted).sum())}


def eoc_figure(results, path: Path) -> Path:
    """Heatmap of final val accuracy over depth x sigma_w2 with theory's 6 xi_c curve overlaid."""
    from bench import theory

    plt = _pyplot()
    grid = eoc_grid(results)
    runs = results.runs
    sigma_b2 = float(runs["init.sigma_b2"].iloc[0])
    sig = grid.columns.to_numpy(dtype=float)
    dep = grid.index.to_numpy(dtype=float)
    # One equal-width column per sigma_w2 (the grid is denser near the critical point); theory's
    # curve is placed on that axis by interpolating log(sigma_w2) between the columns.
    cols = np.arange(len(sig), dtype=float)
    step = np.diff(dep) if len(dep) > 1 else np.array([dep[0]])  # a single depth: a cell of its height
    ye = np.concatenate([[dep[0] - step[0] / 2], (dep[1:] + dep[:-1]) / 2, [dep[-1] + step[-1] / 2]])
    fig, ax = plt.subplots(figsize=(9, 5))
    mesh = ax.pcolormesh(np.arange(len(sig) + 1) - 0.5, ye, grid.to_numpy(), cmap="viridis", vmin=0, vmax=1,
                         shading="flat")
    for i, d in enumerate(dep):
        for j in range(len(sig)):
            v = grid.iloc[i, j]
            ax.text(j, d, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 else "black")
    fine = np.geomspace(sig[0], sig[-1], 120)
    six_xi = [6 * theory.depth_scales("tanh", float(s), sigma_b2)[1] for s in fine]
    ax.plot(np.interp(np.log(fine), np.log(sig), cols), six_xi, color="red", lw=2,
            label=r"$6\,\xi_c$ (mean-field theory)")
    crit = theory.critical_sigma_w2("tanh", sigma_b2)
    ax.axvline(np.interp(np.log(crit), np.log(sig), cols), color="red", ls=":", lw=1.5,
               label=rf"critical $\sigma_w^2$ = {crit:.3f}")
    ax.set_xticks(cols)
    ax.set_xticklabels([f"{s:g}" for s in sig], fontsize=8)
    ax.grid(False)
    ax.set_xlim(-0.5, len(sig) - 0.5)
    ax.set_ylim(ye[0], ye[-1])
    ax.set_xlabel(r"$\sigma_w^2$ (weights $N(0, \sigma_w^2/n)$), $\sigma_b^2$ = " + f"{sigma_b2:g}")
    ax.set_ylabel("depth (linear layers)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.colorbar(mesh, ax=ax, label="final val accuracy (digits; chance 0.1)")
    fig.suptitle(f"Schoenholz et al. 2017: tanh MLP, width {int(runs['width'].iloc[0])}, "
                 f"{int(runs['steps'].iloc[0])} SGD steps", fontsize=10)
    return _save(fig, path)


# --- Saxe et al. 2013 -------------------------------------------------------------
def saxe_times(results) -> pd.DataFrame:
    """Learning time per (init, depth, seed): fewest steps_to_target over the lr grid, and that lr.

    A run that never reached the target counts as never (NaN); so does a configuration where no lr did.
    """
    runs = results.runs
    rows = []
    for (init, depth, seed), g in runs.groupby(["init", "depth", "seed"]):
        hit = g.dropna(subset=["steps_to_target"])
        best = hit.loc[hit["steps_to_target"].idxmin()] if len(hit) else None
        rows.append({"init": init, "depth": int(depth), "seed": int(seed),
                     "steps": float(best["steps_to_target"]) if best is not None else float("nan"),
                     "best_lr": float(best["lr"]) if best is not None else float("nan")})
    return pd.DataFrame(rows)


def saxe_table(results) -> pd.DataFrame:
    """Median learning time over seeds per depth, one column per init, and their ratio."""
    t = saxe_times(results).groupby(["depth", "init"])["steps"].median().unstack("init")
    t.columns = [f"{c} steps" for c in t.columns]
    lrs = saxe_times(results).groupby(["depth", "init"])["best_lr"].median().unstack("init")
    for c in lrs.columns:
        t[f"{c} best lr"] = lrs[c]
    return t.reset_index()


def saxe_figure(results, path: Path) -> Path:
    """Learning time vs depth: at the best lr per depth (left), and for each lr (right)."""
    plt = _pyplot()
    times = saxe_times(results)
    runs = results.runs
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    colors = {"orthogonal": "tab:green", "mean_field": "tab:purple"}
    names = {"orthogonal": "orthogonal", "mean_field": "Gaussian N(0, 1/n)"}
    for init, t in times.groupby("init"):
        med = t.groupby("depth")["steps"].agg(["median", "min", "max"])
        spread = [med["median"] - med["min"], med["max"] - med["median"]]
        axes[0].errorbar(med.index, med["median"], yerr=spread, marker="o", capsize=3, color=colors.get(init),
                         label=names.get(init, init))
    axes[0].set_title("at the best learning rate for each depth", fontsize=9)
    styles = dict(zip(sorted(runs["lr"].unique()), ["-", "--", ":", "-."]))
    for (init, lr), g in runs.groupby(["init", "lr"]):
        med = g.groupby("depth")["steps_to_target"].median()
        axes[1].plot(med.index, med.to_numpy(), marker=".", ls=styles.get(lr, "-"), color=colors.get(init),
                     label=f"{names.get(init, init)}, lr {lr:g}")
    axes[1].set_title("each learning rate (gaps: never reached the target)", fontsize=9)
    depths = sorted(runs["depth"].unique())
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(depths)
        ax.set_xticklabels([str(d) for d in depths])
        ax.minorticks_off()
        ax.set_xlabel("depth (linear layers)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axes[0].set_ylabel("steps to 0.2 x initial train loss")
    fig.suptitle(f"Saxe et al. 2013: deep linear nets on digits, width {int(runs['width'].iloc[0])}, "
                 "plain SGD", fontsize=10)
    return _save(fig, path)


# --- the tutorial -----------------------------------------------------------------
def blog_table(results) -> pd.DataFrame:
    """Per epoch N (our step N + 1, the state after its update): train loss and each parameter's mean."""
    run = results.runs.iloc[0]
    layers = results.layers[(results.layers["job_id"] == run["job_id"])
                            & results.layers["param"].isin(["weight", "bias"])]
    # param is categorical (bench.load): text first, or "+" refuses it
    means = layers.assign(name=lambda d: d["layer"].astype(str) + "." + d["param"].astype(str)) \
        .pivot_table(index="step", columns="name", values="mean")
    loss = results.curves[results.curves["job_id"] == run["job_id"]].set_index("step")["train_loss"]
    order = [f"{2 * i}.{p}" for i in range(int(run["depth"])) for p in ("weight", "bias")]
    out = means[order].join(loss.rename("loss after"))
    out = out[out.index > 0]
    out.insert(0, "epoch", out.index - 1)
    return out.reset_index(drop=True)


def blog_figure(results, path: Path) -> Path:
    """The tutorial's run: loss and each parameter's mean per epoch."""
    plt = _pyplot()
    table = blog_table(results)
    run = results.runs.iloc[0]
    curve = results.curves[results.curves["job_id"] == run["job_id"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(curve["step"], curve["train_loss"], marker=".")
    axes[0].set_xlabel("updates (step)")
    axes[0].set_ylabel("MSE on the ten samples")
    axes[0].set_yscale("log")
    for col in [c for c in table.columns if "." in c]:
        axes[1].plot(table["epoch"], table[col], marker=".", label=col)
    axes[1].set_xlabel("epoch (after its update)")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].set_ylabel("parameter mean")
    axes[1].legend(fontsize=8)
    fig.suptitle("The tutorial's 2-4-1 ReLU net, default init, SGD lr 0.01, full batch", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --- residual streams at step 0 (fixup, resnet_bn, gpt2) ----------------------------
def _stream_input(layers: pd.DataFrame, arch: str) -> pd.Series:
    """Per job, the variance of the residual stream's input at step 0 (what block 0 reads).

    resmlp: the ``stem``'s output; transformer: token plus position embeddings (independent,
    so their variances add); resnet: the stem's ReLU (module ``act``).
    """
    name = layers["layer"].astype(str)
    if arch == "transformer":
        rows = layers[name.isin(["tok", "pos"]) & (layers["param"] == "output")]
    elif arch == "resnet":
        rows = layers[(name == "act") & (layers["param"] == "act")]
    else:
        rows = layers[(name == "stem") & (layers["param"] == "output")]
    return (rows["std"].astype(float) ** 2).groupby(rows["job_id"], observed=True).sum().rename("var_in")


def stream_profile(results) -> pd.DataFrame:
    """Step 0, per job and block count l = 0..depth: Var(stream after l blocks) / Var(stream input).

    The stream after block i is the ``output`` row of module ``blocks.i`` (l = i + 1); l = 0 is
    the input itself (ratio 1). Columns: job_id, the sweep's settings, l, var, var_in, var_ratio.
    """
    layers = results.layers[results.layers["step"] == 0]
    runs = results.runs.drop(columns=["error"], errors="ignore")
    frames = []
    for arch, jobs in runs.groupby("arch"):
        mine = layers[layers["job_id"].isin(jobs["job_id"])]
        var_in = _stream_input(mine, arch)
        name = mine["layer"].astype(str)
        rows = mine[name.str.fullmatch(r"blocks\.\d+") & (mine["param"] == "output")]
        out = pd.DataFrame({"job_id": rows["job_id"].astype(str).to_numpy(),
                            "l": rows["layer"].astype(str).str.split(".").str[1].astype(int).to_numpy() + 1,
                            "var": rows["std"].astype(float).to_numpy() ** 2})
        start = pd.DataFrame({"job_id": var_in.index.astype(str), "l": 0, "var": var_in.to_numpy()})
        out = pd.concat([start, out], ignore_index=True)
        out["var_in"] = out["job_id"].map(dict(zip(var_in.index.astype(str), var_in.to_numpy())))
        frames.append(out)
    out = pd.concat(frames, ignore_index=True)
    out["var_ratio"] = out["var"] / out["var_in"]
    runs = runs.assign(job_id=runs["job_id"].astype(str))
    return out.merge(runs, on="job_id").sort_values(["job_id", "l"]).reset_index(drop=True)


def _at_blocks(profile: pd.DataFrame, by: list[str], ls: Sequence[int]) -> pd.DataFrame:
    """Mean var_ratio over seeds at the block counts ``ls`` (those the nets have), one column per l."""
    rows = profile[profile["l"].isin(ls)]
    table = rows.pivot_table(index=by, columns="l", values="var_ratio", aggfunc="mean")
    table.columns = [f"l={c}" for c in table.columns]
    return table.reset_index()


def _profile_figure(profile: pd.DataFrame, hue: str, style: str | None, title: str, path: Path,
                    predictions: dict[str, pd.DataFrame] | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    keys = [hue] + ([style] if style else [])
    mean = profile.groupby(keys + ["l"], observed=True)["var_ratio"].mean().reset_index()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    hues = list(dict.fromkeys(mean[hue]))
    stys = list(dict.fromkeys(mean[style])) if style else [None]
    for (key, group) in mean.groupby(keys, observed=True, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        label = " ".join(f"{k}" for k in key)
        ax.plot(group["l"], group["var_ratio"], styles[stys.index(key[1]) % 4] if style else "-",
                color=colors[hues.index(key[0]) % len(colors)], marker=".", markersize=3, label=label)
    for label, pred in (predictions or {}).items():
        ax.plot(pred["l"], pred["var_ratio"], color="black", lw=0.8, ls="--", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("blocks l")
    ax.set_ylabel("Var(stream after l blocks) / Var(stream input), step 0")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# --- Fixup / SkipInit / zero-init on a deep residual MLP without norm ------------------
def fixup_step0(results) -> pd.DataFrame:
    """Per (task, init): Var ratio at step 0 after 1, 2, 8, 32 and all blocks, and its per-block growth
    (geometric mean of Var(x_l) / Var(x_{l-1}) over the net)."""
    profile = stream_profile(results)
    depth = int(results.runs["depth"].max())
    table = _at_blocks(profile, ["task", "init"], [1, 2, 8, 32, depth])
    last = profile[profile["l"] == profile["depth"]].groupby(["task", "init"])["var_ratio"].mean()
    table["per_block"] = [float(last.loc[(t, i)]) ** (1.0 / depth)
                          for t, i in zip(table["task"], table["init"])]
    return table


def fixup_training(results) -> pd.DataFrame:
    """Per (task, init, lr): status (ok/diverged), step of divergence, final train loss, val accuracy."""
    runs = results.runs
    cols = ["task", "init", "lr", "status", "diverged_at", "initial_loss", "final_loss", "final_val_acc"]
    return runs[[c for c in cols if c in runs]].sort_values(["task", "init", "lr"]).reset_index(drop=True)


def fixup_table(results) -> pd.DataFrame:
    """Per (task, init): the initial loss and, per learning rate, the final train loss, or '- (s)' for a
    run that diverged at step s (one seed per cell, as the shipped sweep)."""
    runs = results.runs
    cell = [format(float(loss), ".3g") if status == "ok" else f"- ({int(at)})" if pd.notna(at) else "-"
            for status, loss, at in zip(runs["status"], runs["final_loss"], runs["diverged_at"])]
    table = runs.assign(cell=cell).pivot_table(index=["task", "init"], columns="lr", values="cell",
                                               aggfunc="first")
    table.columns = [f"lr={c:g}" for c in table.columns]
    table.insert(0, "initial_loss", runs.groupby(["task", "init"])["initial_loss"].mean())
    return table.reset_index()


def fixup_figure(results, path: Path) -> Path:
    runs = results.runs
    first = runs.sort_values(["task", "lr"]).iloc[0]
    profile = stream_profile(results)
    profile = profile[(profile["task"] == first["task"]) & (profile["lr"] == first["lr"])]
    return _profile_figure(profile, "init", None,
                           f"resmlp, {int(first['depth'])} blocks of width {int(first['width'])}, no norm: "
                           f"step 0 ({first['task']})", path)


# --- BatchNorm in the branch ------------------------------------------------------
def bn_table(results) -> pd.DataFrame:
    """Per init: mean Var ratio at l = 1, 2, 4, 8, 16, 32, 64 blocks (step 0), He's prediction
    1 + 2 l / Var(x_0) (each BN-fed branch adds gain^2 = 2), final train loss and val accuracy."""
    profile = stream_profile(results)
    table = _at_blocks(profile, ["init"], [1, 2, 4, 8, 16, 32, 64])
    var_in = profile.groupby("init")["var_in"].mean()
    table.insert(1, "var_in", table["init"].map(var_in))
    runs = results.runs.groupby("init")
    table["seeds"] = table["init"].map(runs["seed"].count())
    table["final_loss"] = table["init"].map(runs["final_loss"].mean())
    table["val_acc"] = table["init"].map(runs["final_val_acc"].mean())
    return table


def bn_prediction(results, l_max: int) -> pd.DataFrame:
    """He init with BN feeding each branch: Var(x_l) / Var(x_0) = 1 + 2 l / Var(x_0)."""
    profile = stream_profile(results)
    var_in = float(profile.loc[profile["init"] == "kaiming_normal", "var_in"].mean())
    ls = np.arange(l_max + 1)
    return pd.DataFrame({"l": ls, "var_ratio": 1 + 2 * ls / var_in})


def bn_figure(results, path: Path) -> Path:
    profile = stream_profile(results)
    run = results.runs.iloc[0]
    pred = bn_prediction(results, int(profile["l"].max()))
    return _profile_figure(profile, "init", None,
                           f"resmlp + BatchNorm in the branch, {int(run['depth'])} blocks of width "
                           f"{int(run['width'])}, step 0 (mean over seeds)", path,
                           {"1 + 2 l / Var(x0)": pred})


# --- GPT-2's scaled residual init ---------------------------------------------------
def gpt2_table(results) -> pd.DataFrame:
    """Per (init, depth): step-0 Var(stream after the last block) / Var(embeddings) (mean, min, max
    over seeds), final train and val loss (mean), and the task's loss floor."""
    profile = stream_profile(results)
    last = profile[profile["l"] == profile["depth"]]
    table = last.groupby(["init", "depth"]).agg(seeds=("seed", "count"), var_ratio_last=("var_ratio", "mean"),
                                                min=("var_ratio", "min"), max=("var_ratio", "max"))
    runs = results.runs.groupby(["init", "depth"])
    table["initial_loss"] = runs["initial_loss"].mean()
    table["final_loss"] = runs["final_loss"].mean()
    table["final_val_loss"] = runs["final_val_loss"].mean()
    table["final_val_loss_sd"] = runs["final_val_loss"].std()
    table["loss_floor"] = _loss_floor(results.runs.iloc[0])
    return table.reset_index()


def _loss_floor(run: pd.Series) -> float:
    from bench.train import tasks

    params = tuple(sorted((k[5:], v.item() if hasattr(v, "item") else v) for k, v in run.items()
                          if k.startswith("task.") and pd.notna(v)))
    floor = tasks.load(run["task"], params, int(run["seed"])).loss_floor
    return float("nan") if floor is None else float(floor)


def gpt2_figure(results, path: Path) -> Path:
    profile = stream_profile(results)
    run = results.runs.iloc[0]
    return _profile_figure(profile.assign(depth=profile["depth"].map(lambda d: f"L={d}")), "init", "depth",
                           f"pre-LN transformer, width {int(run['width'])}, on markov: step 0 "
                           "(mean over seeds)", path)


# --- init schemes on a plain CNN ---------------------------------------------------
def _cnn_scheme(runs: pd.DataFrame) -> pd.Series:
    mode = runs["init.mode"] if "init.mode" in runs else pd.Series(np.nan, index=runs.index)
    return runs["init"] + np.where(mode.notna(), "(" + mode.astype(str) + ")", "")


def cnn_profile(results) -> pd.DataFrame:
    """Step 0, per job and conv layer k = 1..depth: the second moment of the conv's output (pre-ReLU)."""
    layers = results.layers
    name = layers["layer"].astype(str)
    rows = layers[(layers["step"] == 0) & name.str.fullmatch(r"convs\.\d+") & (layers["param"] == "output")]
    runs = results.runs.assign(scheme=_cnn_scheme(results.runs))
    out = pd.DataFrame({"job_id": rows["job_id"].astype(str).to_numpy(),
                        "k": name[rows.index].str.split(".").str[1].astype(int).to_numpy() + 1,
                        "q": (rows["std"].astype(float) ** 2 + rows["mean"].astype(float) ** 2).to_numpy()})
    runs = runs.assign(job_id=runs["job_id"].astype(str))[["job_id", "scheme", "seed"]]
    return out.merge(runs, on="job_id")


def cnn_table(results) -> pd.DataFrame:
    """Per scheme: step-0 second moment of the first and last conv's output and their ratio (mean over
    seeds); training: runs that learned (val acc > 0.3), val accuracy mean / max, final train loss."""
    prof = cnn_profile(results)
    depth = int(prof["k"].max())
    q = prof.pivot_table(index="scheme", columns="k", values="q", aggfunc="mean")
    ratio = prof.pivot_table(index=["scheme", "seed"], columns="k", values="q")
    ratio = (ratio[depth] / ratio[1]).groupby("scheme").apply(lambda s: float(np.exp(np.log(s).mean())))
    runs = results.runs.assign(scheme=_cnn_scheme(results.runs)).groupby("scheme")
    table = pd.DataFrame({"q_first": q[1], "q_last": q[depth], "last/first": ratio,
                          "per_layer": ratio ** (1.0 / (depth - 1)),
                          "seeds": runs["seed"].count(),
                          "learned": runs["final_val_acc"].apply(lambda a: int((a > 0.3).sum())),
                          "val_acc_mean": runs["final_val_acc"].mean(),
                          "val_acc_max": runs["final_val_acc"].max(),
                          "final_loss": runs["final_loss"].mean()})
    return table.rename_axis("scheme").reset_index()


def cnn_figure(results, path: Path) -> Path:
    plt = _pyplot()
    prof = cnn_profile(results)
    run = results.runs.iloc[0]
    mean = prof.groupby(["scheme", "k"])["q"].mean().reset_index()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for scheme, group in mean.groupby("scheme"):
        ax.plot(group["k"], group["q"], marker=".", label=scheme)
    ax.set_yscale("log")
    ax.set_xlabel("conv layer")
    ax.set_ylabel("second moment of the conv output, step 0")
    ax.legend(fontsize=7)
    ax.set_title(f"plain ReLU CNN, {int(run['depth'])} convs of {int(run['width'])} channels, 8x8 digits "
                 "(mean over seeds)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# --- the muP coordinate check ---------------------------------------------------------
def coord_sizes(results) -> pd.DataFrame:
    """Each module output's coordinate size (RMS) per init, width, step and module, averaged over
    seeds (``bench.report.coord.sizes``: the report's coordinate-check section reads it the same way)."""
    return coord.sizes(results.layers, results.runs, "init")


def coord_table(results) -> pd.DataFrame:
    """Per init, step and module: the log-log slope of coordinate size against width (0: flat in width,
    as muP promises; > 0: grows with width), fitted over the widths of the sweep."""
    return coord.slopes(coord_sizes(results), "init").drop(columns="index")


def coord_figure(results, path: Path) -> Path:
    plt = _pyplot()
    sizes = coord_sizes(results)
    inits, steps = sorted(sizes["init"].unique()), sorted(sizes["step"].unique())
    fig, axes = plt.subplots(len(inits), len(steps), figsize=(3.2 * len(steps), 3.0 * len(inits)),
                             squeeze=False, sharex=True)
    for i, init in enumerate(inits):
        for j, step in enumerate(steps):
            ax = axes[i, j]
            cell = sizes[(sizes["init"] == init) & (sizes["step"] == step)]
            for k, (module, group) in enumerate(cell.groupby("module")):
                ax.plot(group["width"], group["size"], marker=".", lw=1, label=module,
                        color=plt.cm.tab20(k % 20))  # one colour per module: more than tab10 holds
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{init}, step {step}", fontsize=9)
            if i == len(inits) - 1:
                ax.set_xlabel("width")
            if j == 0:
                ax.set_ylabel("coordinate size (RMS)")
    axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("coordinate check (mup's): each module's output size against width", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --- the command --------------------------------------------------------------------
REPRODUCTIONS: dict[str, tuple[Callable, Callable]] = {
    "he2015": (he_table, he_figure),
    "glorot2010": (glorot_table, glorot_figure),
    "edge_of_chaos": (lambda r: eoc_grid(r).reset_index(), eoc_figure),
    "saxe2013": (saxe_table, saxe_figure),
    "blog": (blog_table, blog_figure),
    "fixup": (fixup_table, fixup_figure),
    "resnet_bn": (bn_table, bn_figure),
    "gpt2": (gpt2_table, gpt2_figure),
    "cnn": (cnn_table, cnn_figure),
    "mup_coord": (coord_table, coord_figure),
}


def render(directory: str | Path, out: str | Path) -> tuple[str, str, Path]:
    """Load one reproduction's sweep directory; write its figure; return (name, markdown table, png)."""
    from bench.store import load

    results = load(directory)
    name = str(results.meta.get("spec_name", ""))
    if name not in REPRODUCTIONS:
        raise UserError(f"{directory}: sweep {name!r} is not a reproduction; "
                        f"choose a directory of one of {sorted(REPRODUCTIONS)}")
    if results.runs.empty or (results.runs["status"] == "failed").all():
        raise UserError(f"{directory}: no finished jobs; rerun the sweep")
    table_fn, figure_fn = REPRODUCTIONS[name]
    text = markdown(table_fn(results))
    if name == "edge_of_chaos":
        runs = results.runs
        sigma_b2 = float(runs["init.sigma_b2"].iloc[0])
        theory_table = eoc_theory(sorted(runs["init.sigma_w2"].unique()), sigma_b2)
        text += "\n\n" + markdown(theory_table) + "\n\n" + markdown(pd.DataFrame([eoc_agreement(results)]))
    png = figure_fn(results, Path(out) / f"{name}.png")
    return name, text, png


def parser() -> cli.Parser:
    p = cli.Parser(prog="python -m bench.reproductions", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="sweep directories of the reproduction sweeps")
    p.add_argument("--out", default="docs/figures", help="where the PNGs go (default: docs/figures)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    for directory in args.dirs:
        name, text, png = render(directory, args.out)
        print(f"## {name} ({directory})\n\n{text}\n\nfigure: {png}\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
