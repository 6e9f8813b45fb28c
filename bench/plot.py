"""The report's figures for notebooks and scripts: ``bench.plot.<figure>(results, ...)`` -> a Figure.

Each function draws exactly the figure of ``report.html`` (the same builder; see
docs/report.md for how to read it) from results loaded with :func:`bench.load`, and
returns it as a ``matplotlib.figure.Figure``: Jupyter shows it once, a script can
``fig.savefig("heatmap.png")``. Filter ``results.runs`` first to draw a subset.

Example::

    import bench
    import bench.plot

    r = bench.load("reports/init")
    bench.plot.heatmap(r, "steps")                  # median steps to target, one panel per scheme
    fig = bench.plot.curves(r)                      # learning curves of a few cells
    fig.savefig("curves.png", bbox_inches="tight")

    r.runs = r.runs[r.runs["depth"] >= 8]           # a subset: any filter of the runs table
    bench.plot.profile(r)

A figure with nothing to draw (no per-layer traces after ``bench.load(DIR, traces=False)``,
every job failed, ...) raises :class:`~bench.errors.UserError` saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from bench.store import Results

__all__ = ["profile", "heatmap", "scaling", "curves", "propagation", "trajectories", "FIGURES"]

HEATMAP_METRICS = ("steps", "final_loss")


def _draw(results: Results, build: Callable) -> Figure:
    """Run a report figure builder on ``results`` and return the figure it drew."""
    from bench.report import figures
    from bench.report.grid import prepare

    if not hasattr(results, "runs") or not hasattr(results, "meta"):
        raise UserError(f"bench.plot takes the results of bench.load(DIR), got {type(results).__name__}")
    grid = prepare(results.runs, results.meta)
    with figures.keep() as kept:
        drawn = build(grid)
    if not kept:
        raise UserError(f"{drawn.title}: {drawn.empty or 'nothing to draw'}")
    return kept[-1]


def profile(results: Results) -> Figure:
    """Performance profile: for each scheme, the share of grid cells where it reaches the target
    within tau times the fastest scheme's steps (Dolan-More), and the share it reaches at all."""
    from bench.report.figures import profile_figure

    return _draw(results, profile_figure)


def heatmap(results: Results, metric: str = "steps") -> Figure:
    """Median over seeds of ``metric`` (``"steps"`` to target or ``"final_loss"``) on the grid's two
    main axes (depth x learning rate when they vary), one panel per scheme."""
    from bench.report.figures import heatmap_figure

    if metric not in HEATMAP_METRICS:
        raise UserError(f"bench.plot.heatmap: unknown metric {metric!r}; "
                        f"choose from {', '.join(HEATMAP_METRICS)}")
    return _draw(results, lambda grid: heatmap_figure(grid, metric))


def scaling(results: Results) -> Figure:
    """Success rate, steps to target and final loss along depth (or the first numeric axis), each
    scheme at its best learning rate per depth."""
    from bench.report.training import depth_figure

    return _draw(results, depth_figure)


def curves(results: Results) -> Figure:
    """Training-loss curves (median and quartile band over seeds) of a few cells: the smallest, a
    middle and the largest depth at the best learning rate."""
    from bench.report.training import curves_figure

    return _draw(results, lambda grid: curves_figure(grid, results.curves))


def propagation(results: Results) -> Figure:
    """Signal propagation at initialization in the deepest networks: activation std and weight-gradient
    norm by layer, and measured preactivation second moment against mean-field theory."""
    from bench.report.network import propagation_figure

    return _draw(results, lambda grid: propagation_figure(grid, results.layers))


def trajectories(results: Results) -> Figure:
    """How weights and biases move during training: their mean, std and norm over steps (median over
    the first, middle and last layers' seeds) in the deepest networks of one cell."""
    from bench.report.network import trajectory_figure

    return _draw(results, lambda grid: trajectory_figure(grid, results.layers))


# Every figure by name (what report.html shows, in its order).
FIGURES: dict[str, Callable[..., Figure]] = {
    "profile": profile, "heatmap": heatmap, "scaling": scaling, "curves": curves,
    "propagation": propagation, "trajectories": trajectories,
}
