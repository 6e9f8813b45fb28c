"""The HTML report of a sweep: ``build(DIR)`` writes ``DIR/report.html`` from the results store.

One self-contained file (figures are embedded PNGs, styles inline, no scripts or
external resources), built from a Jinja2 template with autoescaping, so every
string from a spec or a result is shown as text. Beside it go the data behind
it: ``runs`` (one row per job) and ``summary`` (aggregated over seeds) as CSV
and Parquet. See docs/report.md for what each section shows and how to read it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jinja2

from bench.errors import UserError

log = logging.getLogger(__name__)
__all__ = ["build", "render"]

SECTIONS = (("header", "Sweep"), ("leaderboard", "Leaderboard"), ("heatmaps", "Heatmaps"),
            ("depth", "Depth scaling"), ("curves", "Learning curves"), ("network", "Inside the network"),
            ("pathologies", "Pathologies"), ("data", "Data"))


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("bench.report", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def render(results, directory: Path) -> str:
    """The report page for loaded results; writes the data files (runs, summary) into ``directory``."""
    from bench.metrics import summarize
    from bench.report import figures, network, tables, training
    from bench.report.grid import prepare

    timings: dict[str, float] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        timings[name] = time.perf_counter() - start
        return out

    grid = timed("prepare", prepare, results.runs, results.meta)
    regression = tables.regression(directory)
    advice = tables.advice(directory)
    # Only a sweep along width (>= 2 widths) has a coordinate check; without traces its figure says so.
    coord = None if grid.runs.empty else timed("coord", network.coord_section, grid, results.layers)
    network_at = [s[0] for s in SECTIONS].index("network") + 1
    sections = (SECTIONS[:1] + ((("advice", "Advice"),) if advice else ())
                + ((("regression", "Regression"),) if regression else ()) + SECTIONS[1:network_at]
                + ((("coord", "Coordinate check"),) if coord else ()) + SECTIONS[network_at:])
    context = {"sections": sections, "header": tables.header(grid, results.meta),
               "colors": grid.colors, "regression": regression, "advice": advice, "coord": coord}
    if grid.runs.empty:
        context["empty"] = "no data: the store holds no jobs yet"
        context["failures"] = ""
        context["seeds"] = ""
        summary = grid.runs
    else:
        context["empty"] = ""
        context["failures"] = tables.failures(grid.runs)
        context["leaderboard"], context["leaderboard_note"] = timed("leaderboard", tables.leaderboard, grid)
        context["profile"] = timed("profile", figures.profile_figure, grid)
        context["seeds"] = timed("seeds", tables.seeds_needed, grid)
        context["heatmaps"] = [timed(f"heatmap {m}", figures.heatmap_figure, grid, m)
                               for m in ("steps", "final_loss")]
        context["depth"] = timed("depth", training.depth_figure, grid)
        context["curves"] = timed("curves", training.curves_figure, grid, results.curves)
        context["propagation"] = timed("propagation", network.propagation_figure, grid, results.layers)
        context["trajectories"] = timed("trajectories", network.trajectory_figure, grid, results.layers)
        context["pathologies"] = timed("pathologies", tables.pathologies, grid)
        summary = timed("summary", summarize, grid.runs,
                        ["scheme", "init", *grid.scheme_params, *grid.axes])
    runs = grid.runs.drop(columns=["steps"])
    context["files"] = timed("data files", tables.write_data, directory, runs, summary)
    log.debug("report timings: %s", ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return _environment().get_template("report.html").render(**context)


def build(directory: str | Path) -> Path:
    """Write ``DIR/report.html`` (and runs/summary CSV and Parquet beside it) from a sweep's store.

    Args:
        directory: a sweep output directory (holding ``store.sqlite``).

    Returns:
        The path of the written report.

    Raises:
        UserError: the directory does not exist or holds no results store.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory; pass a sweep's output directory "
                        "(the --out of bench.sweep)")
    from bench.store import load  # after the check: it imports torch, seconds for a one-line error
    start = time.perf_counter()
    results = load(directory)
    loaded = time.perf_counter()
    page = render(results, directory)
    path = directory / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    log.info("report: %s (%d jobs; load %.1fs, render %.1fs)", path, len(results.runs), loaded - start,
             time.perf_counter() - loaded)
    return path
