"""``python -m bench.regress``: compare a sweep with a committed baseline; exit 1 on a real regression.

- ``run SPEC.toml --against FILE.json``: run the sweep, then check it (the one line for CI).
- ``check DIR --against FILE.json``: compare cell by cell; print every regression and
  improvement, write ``DIR/regression.md`` and ``DIR/regression.json``.
- ``save DIR --to FILE.json``: keep the per-seed metrics of every grid cell as a baseline.
- ``baseline SPEC.toml --seeds 8 --to FILE.json``: sweep the spec with more seeds, then save.
- ``calibrate DIR``: measure the false-alarm rate (or power) by reseeded comparisons.

Exit codes: 0 no regression, 1 a regression (or missing cells, or crashed jobs), 2 bad input.
The statistics live in :mod:`bench.verdict`, the file format in :mod:`bench.baseline`;
docs/ci.md explains the policy and its measured false-alarm rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import cli, runner
from bench.baseline import (
    VERSION,
    Baseline,
    cells_from_runs,
    encode,
    labels,
    load_baseline,
    save,
    subset,
    widen_seeds,
)
from bench.errors import EXIT_FAILED, EXIT_OK, UserError
from bench.files import write_atomic
from bench.verdict import (
    METRICS,
    STORED,
    SUCCESS,
    Cell,
    Comparison,
    Policy,
    Tolerance,
    compare_metric,
    decide,
    format_change,
    paired_flips,
    parse_table,
    parse_tolerance,
)

__all__ = ["parse_table", "check", "calibrate", "main"]
REPORT_FORMAT = "initbench-regression"


# --- the check ---------------------------------------------------------------------------------
@dataclass
class Report:
    """Everything a check found; ``failed`` decides the exit code."""

    policy: Policy
    comparisons: list[Comparison]
    labels: dict[str, str]
    missing: list[str] = field(default_factory=list)  # cell keys in the baseline only
    new: list[str] = field(default_factory=list)  # cell keys in the current sweep only
    crashed: dict[str, list[str]] = field(default_factory=dict)  # cell key -> errors
    allow_missing: bool = False

    def count(self, verdict: str) -> int:
        return sum(c.verdict == verdict for c in self.comparisons)

    @property
    def failed(self) -> bool:
        return bool(self.count("regression") or self.crashed
                    or ((self.missing or self.new) and not self.allow_missing))


def check(current: Mapping[str, Cell], baseline: Mapping[str, Cell], policy: Policy,
          allow_missing: bool = False, axes: Sequence[str] = ()) -> Report:
    """Compare two sets of cells metric by metric under ``policy`` (see :mod:`bench.verdict`)."""
    comparisons, flips = [], {}
    for key in sorted(set(current) & set(baseline)):
        for name in policy.metrics:
            tolerance = policy.tolerance(name)
            comparisons.append(compare_metric(METRICS[name], tolerance, baseline[key], current[key]))
        flips[key] = paired_flips(baseline[key], current[key])
    decide(comparisons, METRICS, policy.alpha)
    for comp in comparisons:
        if comp.metric == SUCCESS and flips.get(comp.key):
            comp.verdict, comp.message = "regression", flips[comp.key]
    crashed = {k: c.errors or ["(no error recorded)"] for k, c in current.items() if "failed" in c.status}
    return Report(policy, comparisons, labels([*baseline.values(), *current.values()], axes),
                  sorted(set(baseline) - set(current)), sorted(set(current) - set(baseline)), crashed,
                  allow_missing)


def _sample_text(comp: Comparison, value: float, n: int) -> str:
    if math.isnan(value):
        return f"- ({n})"
    return f"{value:.0%} ({n})" if comp.metric == SUCCESS else f"{value:.4g} ({n})"


HEADERS = ("verdict", "cell", "metric", "baseline (n)", "current (n)", "change", "tolerance", "q")


def table_rows(report: Report) -> list[tuple[str, ...]]:
    """Every regression, improvement, crashed, missing and new cell as a table row (regressions first)."""
    order = {m: i for i, m in enumerate(report.policy.metrics)}
    found = [c for c in report.comparisons if c.verdict in ("regression", "improvement")]
    found.sort(key=lambda c: (c.verdict != "regression", report.labels[c.key], order[c.metric]))
    rows = [(c.verdict.upper() if c.verdict == "regression" else c.verdict, report.labels[c.key], c.metric,
             _sample_text(c, c.baseline, c.n_baseline), _sample_text(c, c.current, c.n_current),
             format_change(c), str(c.tolerance), f"{c.q:.2g}") for c in found]
    rows += [("CRASHED", report.labels[k], "status", "", f"{len(e)} seeds failed", "", "", "")
             for k, e in report.crashed.items()]
    missing, new = ("missing", "new") if report.allow_missing else ("MISSING", "NEW")
    rows += [(missing, report.labels[k], "", "in baseline", "not run", "", "", "") for k in report.missing]
    rows += [(new, report.labels[k], "", "not in baseline", "run", "", "", "") for k in report.new]
    return rows


def summary(report: Report, against: Path) -> str:
    cells = len({c.key for c in report.comparisons})
    tested = sum(not math.isnan(c.q) for c in report.comparisons)
    parts = [f"{report.count('regression')} regressions", f"{report.count('improvement')} improvements"]
    others = (("crashed cells", report.crashed), ("missing cells", report.missing), ("new cells", report.new))
    parts += [f"{len(v)} {k}" for k, v in others if v]
    verdict = "FAIL" if report.failed else "pass"
    return (f"regress: {', '.join(parts)} in {cells} cells x {len(report.policy.metrics)} metrics "
            f"({tested} tests, alpha {report.policy.alpha:g}) against {against} -> {verdict}")


def text_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [HEADERS, *rows]) for i in range(len(HEADERS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [HEADERS, *rows])


def markdown(report: Report, baseline: Baseline, env: Mapping[str, Any], against: Path) -> str:
    """The report as Markdown: summary, table, messages, policy and environments."""
    rows = table_rows(report)
    out = ["# Regression check", "", summary(report, against), ""]
    if rows:
        out += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        out += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in rows]
        out.append("")
    notes = sorted(f"- {report.labels[c.key]}: {c.message}" for c in report.comparisons
                   if c.verdict == "regression")
    notes += [f"- {report.labels[k]}: crashed: {'; '.join(e)}" for k, e in report.crashed.items()]
    out += (["## Why", "", *notes, ""] if notes else [])
    tols = ", ".join(f"{m} {t}" for m, t in report.policy.describe()["tolerances"].items())
    out += ["## Policy", "", f"alpha {report.policy.alpha:g} (Benjamini-Hochberg over cells x metrics); "
            f"tolerances: {tols}. See docs/ci.md.", "",
            "## Environments", "", f"- baseline ({baseline.created}): {_env_text(baseline.environment)}",
            f"- current: {_env_text(env)}", ""]
    return "\n".join(out)


def _env_text(env: Mapping[str, Any]) -> str:
    keys = ("torch_version", "device", "host", "python", "initbench")
    return ", ".join(f"{k} {env[k]}" for k in keys if env.get(k)) or "unknown"


def report_doc(report: Report, baseline: Baseline, env: Mapping[str, Any], against: Path) -> dict[str, Any]:
    """The machine-readable report (``regression.json``; the HTML report shows a section from it)."""
    def num(x: float) -> float | str | None:
        return encode(float(x))

    return {"format": REPORT_FORMAT, "version": VERSION, "baseline": str(against),
            "passed": not report.failed,
            "summary": {"regressions": report.count("regression"),
                        "improvements": report.count("improvement"),
                        "untested": report.count("untested"), "comparisons": len(report.comparisons),
                        "crashed_cells": len(report.crashed), "missing_cells": len(report.missing),
                        "new_cells": len(report.new), "text": summary(report, against)},
            "policy": report.policy.describe(), "allow_missing": report.allow_missing,
            "environment": {"baseline": baseline.environment, "current": dict(env)},
            "rows": [{"verdict": c.verdict, "key": c.key, "cell": report.labels[c.key], "metric": c.metric,
                      "baseline": num(c.baseline), "current": num(c.current), "n_baseline": c.n_baseline,
                      "n_current": c.n_current, "change": num(c.change), "change_text": format_change(c),
                      "tolerance": str(c.tolerance), "p": num(c.p), "q": num(c.q), "message": c.message}
                     for c in report.comparisons],
            "missing": [{"key": k, "cell": report.labels[k]} for k in report.missing],
            "new": [{"key": k, "cell": report.labels[k]} for k in report.new],
            "crashed": [{"key": k, "cell": report.labels[k], "errors": e} for k, e in report.crashed.items()]}


def stored_policy(meta: Mapping[str, Any], where: str) -> Policy:
    """The ``[regression]`` policy a sweep stored when it ran (validated then); from its spec text
    for a store written before the policy was stored."""
    if isinstance(meta.get("regression"), dict):
        return parse_table(meta["regression"], f"{where} [regression]")
    return spec_policy(str(meta.get("spec_text", "")), where)


def spec_policy(spec_text: str, where: str) -> Policy:
    """The ``[regression]`` table of a sweep's stored spec text, as a policy (defaults if none)."""
    try:
        table = tomllib.loads(spec_text).get("regression", {}) if spec_text else {}
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{where}: stored spec is not valid TOML ({err})") from None
    return parse_table(table, f"{where} [regression]")


def run_check(directory: Path, baseline: Baseline, fails: Sequence[tuple[str, Tolerance]],
              alpha: float | None, allow_missing: bool) -> int:
    """Check a sweep directory against a loaded baseline; print and write the report; the exit code."""
    from bench.store import load

    results = load(directory, traces=False)
    policy = stored_policy(results.meta, str(results.meta.get("spec_path") or directory))
    policy = policy.with_tolerances(fails)
    if alpha is not None:
        policy = replace(policy, alpha=alpha)
    absent = [m for m in policy.metrics if m != SUCCESS and m not in baseline.metrics]
    if absent:
        raise UserError(f"baseline {baseline.path} has no values for {absent}; "
                        "re-save it with this initbench")
    current = cells_from_runs(results.runs)
    if not set(current) & set(baseline.cells):
        made = baseline.spec.get("path") or "another spec"
        raise UserError(f"{directory} has no grid cell in common with baseline {baseline.path} (made from "
                        f"{made}); check the spec, or refresh the baseline")
    report = check(current, baseline.cells, policy, allow_missing, [*results.axes, *baseline.axes])
    env = results.meta.get("env", {})
    doc = report_doc(report, baseline, env, baseline.path)
    write_atomic(directory / "regression.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")
    write_atomic(directory / "regression.md", markdown(report, baseline, env, baseline.path))
    rows = table_rows(report)
    if rows:
        print(text_table(rows))
    print(f"baseline: {_env_text(baseline.environment)}; current: {_env_text(env)}")
    print(summary(report, baseline.path) + f" (report: {directory / 'regression.md'})")
    return EXIT_FAILED if report.failed else EXIT_OK


# --- calibration: the false-alarm rate of reseeded comparisons --------------------------------
def calibrate(cells: Mapping[str, Cell], policy: Policy, n_seeds: int, trials: int, seed: int = 0,
              plant: tuple[str, float] | None = None,
              n_baseline: int | None = None) -> tuple[int, dict[str, int]]:
    """Compare disjoint random seed subsets of one sweep ``trials`` times.

    Each trial draws ``n_baseline`` (default ``n_seeds``) seeds as the baseline and ``n_seeds``
    others as the current sweep. Without ``plant`` every regression found is a false alarm; with
    ``plant = (metric, factor)`` the current values of that metric are multiplied by ``factor`` in
    every cell, and the share of trials that find it measures detection power.

    Returns:
        (trials with at least one regression, regressions found per metric over all trials).
    """
    n_baseline = n_baseline or n_seeds
    pool = sorted(set.intersection(*(set(c.seeds) for c in cells.values())))
    if len(pool) < n_baseline + n_seeds:
        raise UserError(f"calibrate needs {n_baseline} + {n_seeds} seeds in every cell; the sweep has "
                        f"{len(pool)} in all of them (sweep more seeds, e.g. with bench.regress baseline)")
    rng = np.random.default_rng(seed)
    hits, per_metric = 0, dict.fromkeys(policy.metrics, 0)
    for _ in range(trials):
        draw = [int(s) for s in rng.permutation(pool)[: n_baseline + n_seeds]]
        base = {k: subset(c, set(draw[:n_baseline])) for k, c in cells.items()}
        cur = {k: subset(c, set(draw[n_baseline:])) for k, c in cells.items()}
        if plant:
            for c in cur.values():
                c.values[plant[0]] = [v * plant[1] for v in c.values[plant[0]]]
        flagged = [c.metric for c in check(cur, base, policy).comparisons if c.verdict == "regression"]
        hits += bool(flagged)
        for m in flagged:
            per_metric[m] += 1
    return hits, per_metric


# --- command line -------------------------------------------------------------------------------
def fail_arg(text: str) -> tuple[str, Tolerance]:
    """argparse type of ``--fail METRIC:TOL`` (e.g. ``steps_to_target:10%``, ``final_loss:0.01``)."""
    name, sep, tol = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected METRIC:TOL like steps_to_target:10% or final_loss:0.01, "
                                         f"got {text!r}")
    if name not in METRICS:
        raise argparse.ArgumentTypeError(f"unknown metric {name!r}; choose from {list(METRICS)}")
    try:
        return name, parse_tolerance(tol, name)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def alpha_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, e.g. 0.01, got {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _policy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fail", type=fail_arg, action="append", default=[], metavar="METRIC:TOL",
                   help="tolerance for a metric, relative (steps_to_target:10%%) or absolute "
                        f"(final_loss:0.01); also watches it; repeatable. Metrics: {', '.join(METRICS)}")
    p.add_argument("--alpha", type=alpha_arg, help="false-discovery level (default: the spec's, else 0.01)")


def _sweep_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="the sweep spec (TOML)")
    cli.add_run_flags(p)


def parser() -> cli.Parser:
    p = cli.Parser(prog=cli.prog("python -m bench.regress"), description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    r = sub.add_parser("run", help="run a sweep, then compare it with a baseline (for CI)")
    _sweep_flags(r)
    r.add_argument("--out", type=Path, help="output directory (default: reports/<spec name>/)")
    r.add_argument("--resume", action="store_true",
                   help="keep earlier results in --out (default: start fresh)")
    c = sub.add_parser("check", help="compare a finished sweep with a baseline")
    c.add_argument("dir", type=Path, help="the sweep's output directory")
    for q in (r, c):
        q.add_argument("--against", type=Path, required=True, metavar="FILE.json", help="the baseline")
        _policy_flags(q)
        q.add_argument("--allow-missing", action="store_true", help="cells on one side only do not fail")
    s = sub.add_parser("save", help="save a finished sweep as a baseline")
    s.add_argument("dir", type=Path, help="the sweep's output directory")
    s.add_argument("--to", type=Path, required=True, metavar="FILE.json", help="the baseline file to write")
    b = sub.add_parser("baseline", help="sweep a spec with more seeds, then save it as a baseline")
    _sweep_flags(b)
    b.add_argument("--seeds", type=_positive, default=8,
                   help="seeds in the baseline: the spec's own, then the smallest others (default: 8)")
    b.add_argument("--to", type=Path, required=True, metavar="FILE.json", help="the baseline file to write")
    b.add_argument("--out", type=Path, help="sweep directory (default: reports/<spec name>-baseline/)")
    b.add_argument("--fresh", action="store_true", help="delete earlier results in --out first")
    k = sub.add_parser("calibrate", help="measure false alarms (or power) by comparing disjoint seed subsets")
    k.add_argument("dir", type=Path, help="a sweep with many seeds per cell")
    k.add_argument("--seeds", type=_positive, default=3, help="seeds of the current side (default: 3)")
    k.add_argument("--baseline-seeds", type=_positive, help="seeds of the baseline side (default: --seeds)")
    k.add_argument("--trials", type=_positive, default=500, help="reseeded comparisons (default: 500)")
    k.add_argument("--plant", type=_plant_arg, metavar="METRIC:FACTOR",
                   help="multiply the current side's METRIC by FACTOR: measures detection power instead")
    _policy_flags(k)
    return p


def _plant_arg(text: str) -> tuple[str, float]:
    name, _, factor = text.partition(":")
    try:
        value = float(factor)
        if name not in STORED or not math.isfinite(value) or value <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected METRIC:FACTOR like final_loss:1.5 with METRIC in "
                                         f"{list(STORED)}, got {text!r}") from None
    return name, value


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "baseline":
        code, directory = _sweep_more_seeds(args)
        return _save(directory, args.to, args.spec) if code == EXIT_OK else code
    if args.command == "save":
        return _save(args.dir, args.to)
    baseline = load_baseline(args.against)  # before any sweep: a bad baseline fails in a second
    if args.command == "check":
        return run_check(args.dir, baseline, args.fail, args.alpha, args.allow_missing)
    return _run(args, baseline)


def _save(directory: Path, to: Path, spec_path: str | None = None) -> int:
    doc = save(directory, to, spec_path)
    seeds = sorted({s for c in doc["cells"] for s in c["seeds"]})
    print(f"regress: saved {len(doc['cells'])} cells x seeds {seeds} of {doc['spec']['name'] or directory} "
          f"to {to}")
    crashed = sum(c["status"].count("failed") for c in doc["cells"])
    if crashed:
        print(f"warning: {crashed} jobs had crashed; their seeds are ignored in comparisons", file=sys.stderr)
    return EXIT_OK


def _run_options(args: argparse.Namespace, out: Path, fresh: bool) -> runner.RunOptions:
    return replace(runner.RunOptions.from_args(args), out=out, fresh=fresh, no_report=True)


def _run(args: argparse.Namespace, baseline: Baseline) -> int:
    from bench import spec

    out = args.out or runner.default_out(spec.load(args.spec).name)
    code = runner.run(args.spec, _run_options(args, out, fresh=not args.resume))
    if code not in (EXIT_OK, EXIT_FAILED):
        return code  # interrupted (130) or terminated (143): nothing to check
    verdict = run_check(out, baseline, args.fail, args.alpha, args.allow_missing)
    if not args.no_report:
        runner.write_report(out, args.quiet)  # after regression.json exists, so the report shows it
    return max(code, verdict)


def _sweep_more_seeds(args: argparse.Namespace) -> tuple[int, Path]:
    """``baseline``: write the spec with a wider seed axis into the sweep directory and sweep it."""
    from bench import spec

    original = spec.load(args.spec)
    text, seeds = widen_seeds(original.text, args.spec, args.seeds)
    out = args.out or runner.default_out(f"{original.name}-baseline")
    write_atomic(out / "spec.toml", text)
    print(f"regress: sweeping {args.spec} with seeds {seeds} into {out}")
    code = runner.run(out / "spec.toml", _run_options(args, out, fresh=args.fresh))
    if code == EXIT_FAILED:
        print(f"regress: some jobs crashed; not saving a baseline (see {out})", file=sys.stderr)
    elif code == EXIT_OK and not args.no_report:
        runner.write_report(out, args.quiet)
    return code, out


def _calibrate(args: argparse.Namespace) -> int:
    from bench.store import load

    results = load(args.dir, traces=False)
    policy = stored_policy(results.meta, str(args.dir)).with_tolerances(args.fail)
    policy = replace(policy, alpha=args.alpha) if args.alpha else policy
    cells = cells_from_runs(results.runs)
    n_baseline = args.baseline_seeds or args.seeds
    hits, per = calibrate(cells, policy, args.seeds, args.trials, plant=args.plant, n_baseline=n_baseline)
    what = f"planted {args.plant[0]} x{args.plant[1]:g}: found" if args.plant else "false alarms"
    low, high = _binomial_ci(hits, args.trials)
    print(f"calibrate: {args.trials} comparisons of {n_baseline} vs {args.seeds} disjoint "
          f"seeds in {len(cells)} cells x {len(policy.metrics)} metrics (alpha {policy.alpha:g}): {what} in "
          f"{hits} ({hits / args.trials:.1%}, 95% CI {low:.1%}-{high:.1%}); regressions per metric: "
          + ", ".join(f"{m} {n}" for m, n in per.items()))
    return EXIT_OK


def _binomial_ci(k: int, n: int) -> tuple[float, float]:
    from scipy import stats

    ci = stats.binomtest(k, n).proportion_ci(0.95)
    return float(ci.low), float(ci.high)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m bench.regress``."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
