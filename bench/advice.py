"""Which init for *my* network: a step-0 screen, a budgeted sweep of the survivors, a ranked answer.

:func:`advise` is what ``python -m bench.advise`` runs:

1. **Applicability.** Every registered scheme is tried on the model once (built, initialized):
   a scheme that needs a structure the model lacks (Fixup without residual gates, a Kaiming
   gain without an activation) is left out, with its reason.
2. **Screen.** One forward and backward pass per applicable scheme and seed (a one-step
   sweep): activation and gradient ratios across depth, dead and symmetric units, theory's
   prediction where it applies. A scheme whose start is pathological in a majority of seeds
   is reported with the reason and not trained.
3. **Budgeted sweep.** One training step of a bundle is timed; the learning-rate grid
   (log-spaced around the optimizer's usual range), the seeds and the steps are chosen so
   that the sweep fits what is left of the budget; it runs as a normal, resumable sweep.
4. **Ranking.** Per scheme, its loss at its best learning rate (mean over seeds, bootstrap CI)
   and a performance profile over the learning rates (the share at which it is within 5 % of
   the best scheme); the recommendation, its margin over the runner-up with a bootstrap CI of
   the difference, and the caveats the data supports (differences within noise, few seeds,
   learning rates at which everything diverges).
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import UserError
from bench.files import write_atomic

# Learning-rate ranges people use, per optimizer: the grid is log-spaced across them.
LR_RANGE = {"sgd": (3e-3, 3e-1), "adam": (3e-4, 3e-2)}
# Step-0 flags that make a start pathological (the rest describe training, which has not happened).
SCREEN_FLAGS = (
    "vanishing_gradients",
    "exploding_gradients",
    "vanishing_activations",
    "exploding_activations",
    "dead_units",
    "symmetric_units",
    "diverged",
)
PROFILE_TOLERANCE = 0.05  # a scheme "does as well" at a learning rate within 5 % of the best loss there
MIN_STEPS, MAX_STEPS = 20, 10000
MAX_SEEDS = 10  # beyond MAX_STEPS a budget buys seeds, up to this many


@dataclass(frozen=True)
class Request:
    """What the user asked: the model, the task, and how much time and how many seeds."""

    model: str  # a built-in architecture or "pkg.module:fn"
    task: str  # a built-in task or "pkg.module:fn"
    model_settings: tuple[tuple[str, Any], ...] = ()
    task_settings: tuple[tuple[str, Any], ...] = ()
    budget_s: float = 180.0
    optimizer: str = "sgd"
    seeds: int = 3
    batch_size: int = 64
    out: Path = Path("reports/advise")
    fresh: bool = False  # start over; by default an interrupted advise resumes its advise.toml


@dataclass
class Advice:
    """The answer: the screen, the ranking, the recommendation and its caveats (advice.json)."""

    screen: pd.DataFrame
    ranking: pd.DataFrame
    recommended: str | None
    best_lrs: list[float]
    margin: dict[str, float]
    caveats: list[str]
    paragraph: str
    timing: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def rows(df: pd.DataFrame) -> list[dict]:
            return json.loads(df.to_json(orient="records")) if len(df) else []

        return {
            "recommended": self.recommended,
            "best_lrs": self.best_lrs,
            "margin": self.margin,
            "caveats": self.caveats,
            "advice": self.paragraph,
            "screen": rows(self.screen),
            "ranking": rows(self.ranking),
            "timing": self.timing,
        }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def spec_text(
    req: Request,
    name: str,
    inits: Sequence[str],
    lrs: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    log_every: int,
) -> str:
    """A sweep spec (TOML) for the request: what advise runs, and what the user can rerun or extend."""
    model = {"arch": req.model, **dict(req.model_settings)}
    lines = [
        f"name = {json.dumps(name)}",
        "",
        "[grid]",
        f"init = {_toml_value(list(inits))}",
        f"lr = {_toml_value([float(f'{x:.3g}') for x in lrs])}",
        f"seed = {_toml_value(list(seeds))}",
        "",
        "[model]",
        *(f"{k} = {_toml_value(v)}" for k, v in model.items()),
        "",
        "[task]",
        f"name = {json.dumps(req.task)}",
        *(f"{k} = {_toml_value(v)}" for k, v in req.task_settings),
        "",
        "[train]",
        f"optimizer = {json.dumps(req.optimizer)}",
        f"steps = {steps}",
        f"batch_size = {req.batch_size}",
        f"log_every = {log_every}",
    ]
    if req.optimizer == "sgd":
        lines.append("momentum = 0.9")
    return "\n".join(lines) + "\n"


def applicable(req: Request) -> tuple[list[str], dict[str, str]]:
    """The schemes that can initialize the model, and for the others why not (a one-line reason)."""
    from bench import spec as specs
    from bench.train import inits, tasks
    from bench.train.bundle import build_model

    ok, why = [], {}
    for scheme in inits.INITS:
        text = spec_text(req, "probe", [scheme], [0.01], [0], 1, 1)
        try:
            job = specs.parse(text).jobs()[0]
            build_model(job, tasks.load(job.task, job.task_params, job.seed))
        except (UserError, tasks.TaskError) as err:
            why[scheme] = str(err).split(": ", 1)[-1][:200]
            continue
        except Exception as err:  # noqa: BLE001 - a scheme that breaks on this model is not applicable
            why[scheme] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            continue
        ok.append(scheme)
    if not ok:
        raise UserError(
            f"no init scheme applies to {req.model}: " + "; ".join(f"{k}: {v}" for k, v in why.items())
        )
    return ok, why


def _run(text: str, directory: Path, quiet: bool = True, report: bool = False) -> tuple[int, float]:
    from bench import runner

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "spec.toml"
    write_atomic(path, text)
    start = time.perf_counter()
    # fresh: a screen or a timing run measures this machine now, never a stored earlier result
    code = runner.run(path, runner.RunOptions(out=directory, quiet=quiet, no_report=not report, fresh=True))
    return code, time.perf_counter() - start


def screen(req: Request, schemes: Sequence[str], seeds: int = 3) -> tuple[pd.DataFrame, float]:
    """Step-0 measurements per scheme (medians over seeds) and which starts are pathological.

    Returns the screen table and the seconds it took. Columns: scheme, act_ratio, grad_ratio,
    dead_frac, symmetric_frac, signal_error (theory vs measurement, NaN where theory has nothing to
    say), flags (step-0 pathologies raised in a majority of seeds), verdict (``train`` or ``skip``).
    """
    from bench.store import load

    text = spec_text(req, "advise-screen", schemes, [1e-12], list(range(seeds)), 1, 1)
    _, took = _run(text, req.out / "screen")
    runs = load(req.out / "screen", traces=False).runs
    rows = []
    for scheme, group in runs.groupby("init", sort=False):
        flags = [set(filter(None, str(p).split(","))) & set(SCREEN_FLAGS) for p in group["pathologies"]]
        # A "diverged" at the screen's one step of a negligible learning rate is a start that overflows.
        counted = {f: sum(f in fl for fl in flags) for f in SCREEN_FLAGS}
        majority = [f for f, n in counted.items() if n * 2 > len(group)]
        failed = (group["status"] == "failed").all()
        rows.append(
            {
                "scheme": scheme,
                "act_ratio": float(group["act_ratio_init"].median()),
                "grad_ratio": float(group["grad_ratio_init"].median()),
                "dead_frac": float(group["dead_frac_init"].median()),
                "symmetric_frac": float(group["symmetric_frac_init"].median()),
                "signal_error": float(group["signal_error"].median()),
                "flags": ",".join(majority) or ("failed: " + str(group["error"].iloc[0]) if failed else ""),
                "verdict": "skip" if majority or failed else "train",
            }
        )
    return pd.DataFrame(rows), took


PROBES = 20  # the budgeted sweep logs (and probes) about this many times, whatever its steps


def _step_time(req: Request, schemes: Sequence[str], n_lrs: int, seeds: int) -> tuple[float, float]:
    """(fixed seconds, seconds per step) of a sweep of ``len(schemes) x n_lrs x seeds`` jobs.

    Three short runs: 10 steps and 10 + n steps probed only at their ends give the cost of n
    plain steps (their difference) and what any run pays once (building models, loading data,
    starting workers); 10 steps probed at every step give the cost of a probe, of which the
    budgeted sweep pays ``PROBES``: those are counted in the fixed seconds. n is 50, fewer (down
    to 10) when the first run says 50 more steps would take over a tenth of the budget. For a
    model so small that timing noise swamps the difference, a step is taken to cost at least a
    quarter of the longer run's average.
    """
    lo, hi = LR_RANGE[req.optimizer]
    lrs, seed_list = np.geomspace(lo, hi, n_lrs), list(range(seeds))

    def timed(steps: int, log_every: int) -> float:
        text = spec_text(req, "advise-timing", schemes, lrs, seed_list, steps, log_every)
        return _run(text, req.out / "timing")[1]

    first = timed(10, 10)
    extra = int(min(50, max(10, 0.1 * req.budget_s / max(first / 10, 1e-6))))
    second = timed(10 + extra, 10 + extra)
    probed = timed(10, 1)
    step_s = max((second - first) / extra, 0.25 * second / (10 + extra))
    probe_s = max((probed - first) / 9, 0.0)  # 11 probes against 2
    return max(first - 10 * step_s, 0.0) + PROBES * probe_s, step_s


def plan(req: Request, schemes: Sequence[str], remaining_s: float) -> tuple[list[float], int, float, float]:
    """The learning rates and seeds that fit ``remaining_s``: (lrs, seeds, seconds a step, fixed seconds).

    One sweep of the largest grid (5 learning rates x the seeds) is timed; smaller grids are
    estimated from it per job. Fewer learning rates, then fewer seeds, when even ``MIN_STEPS``
    does not fit.
    """
    lo, hi = LR_RANGE[req.optimizer]
    full = 5 * req.seeds * len(schemes)
    fixed, step_all = _step_time(req, schemes, 5, req.seeds)
    per_job = step_all / full
    for n_lrs, seeds in (
        (5, req.seeds),
        (4, req.seeds),
        (3, req.seeds),
        (3, min(req.seeds, 2)),
        (2, min(req.seeds, 2)),
    ):
        step_s = per_job * n_lrs * seeds * len(schemes)
        steps = int((remaining_s - fixed) / step_s)
        if steps >= MIN_STEPS:
            return list(np.geomspace(lo, hi, n_lrs)), seeds, step_s, fixed
    seeds = min(req.seeds, 2)
    return list(np.geomspace(lo, hi, 2)), seeds, per_job * 2 * seeds * len(schemes), fixed


def _bootstrap_diff(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap CI of mean(b) - mean(a) (seeds resampled independently)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    diffs = b[rng.integers(0, len(b), (n, len(b)))].mean(1) - a[rng.integers(0, len(a), (n, len(a)))].mean(1)
    return float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def rank(runs: pd.DataFrame, metric: str = "final_val_loss") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Rank schemes by their loss at their own best learning rate; profile over learning rates.

    A diverged or failed seed counts as infinitely bad at its learning rate. Returns the ranking
    (scheme, best_lr, loss, ci_low, ci_high, profile, diverged_lrs) and facts for the caveats.
    """
    from bench.metrics import bootstrap_ci

    if metric not in runs or runs[metric].isna().all():
        metric = "final_loss"
    runs = runs.assign(score=runs[metric].where(runs["status"] == "ok", np.inf))
    med = runs.groupby(["init", "lr"])["score"].median().unstack("lr")
    best_at_lr = med.min(axis=0)
    rows = []
    for scheme, row in med.iterrows():
        finite = row[np.isfinite(row)]
        if finite.empty:
            rows.append(
                {
                    "scheme": scheme,
                    "best_lr": float("nan"),
                    "loss": float("inf"),
                    "ci_low": float("nan"),
                    "ci_high": float("nan"),
                    "profile": 0.0,
                    "good_lrs": [],
                    "seeds": 0,
                }
            )
            continue
        best_lr = float(finite.idxmin())
        values = runs[(runs["init"] == scheme) & (runs["lr"] == best_lr)]["score"].to_numpy(float)
        low, high = bootstrap_ci(values[np.isfinite(values)])
        within = (row <= best_at_lr * (1 + PROFILE_TOLERANCE)) & np.isfinite(row)
        good = [float(lr) for lr, v in row.items() if np.isfinite(v) and v <= finite.min() * 1.1]
        rows.append(
            {
                "scheme": scheme,
                "best_lr": best_lr,
                "loss": float(np.mean(values[np.isfinite(values)])),
                "ci_low": low,
                "ci_high": high,
                "profile": float(within.mean()),
                "good_lrs": good,
                "seeds": int(np.isfinite(values).sum()),
            }
        )
    ranking = (
        pd.DataFrame(rows).sort_values(["loss", "profile"], ascending=[True, False]).reset_index(drop=True)
    )
    diverged = runs.groupby("lr")["status"].apply(lambda s: bool((s != "ok").all()))
    facts = {
        "metric": metric,
        "all_diverge_lrs": [float(lr) for lr, d in diverged.items() if d],
        "scores": {
            s: runs[(runs["init"] == s) & (runs["lr"] == r)]["score"].to_numpy(float)
            for s, r in zip(ranking["scheme"], ranking["best_lr"])
        },
    }
    return ranking, facts


def conclude(
    ranking: pd.DataFrame, facts: dict[str, Any], screen_table: pd.DataFrame, seeds: int
) -> tuple[str | None, dict[str, float], list[str], str]:
    """The recommendation, its margin over the runner-up, the caveats and the paragraph to print."""
    caveats: list[str] = []
    skipped = screen_table[screen_table["verdict"] == "skip"]
    trained = ranking[np.isfinite(ranking["loss"])]
    if trained.empty:
        return (
            None,
            {},
            ["every scheme that was trained diverged or failed at every learning rate"],
            (
                "No recommendation: every scheme that passed the screen diverged or failed at every learning "
                "rate tried; try a smaller learning-rate range or look at the screen."
            ),
        )
    best = trained.iloc[0]
    margin: dict[str, float] = {}
    noise: list[str] = [str(best["scheme"])]
    for _, other in trained.iloc[1:].iterrows():
        low, high = _bootstrap_diff(facts["scores"][best["scheme"]], facts["scores"][other["scheme"]])
        if other["scheme"] == trained.iloc[1]["scheme"]:
            margin = {
                "runner_up": str(other["scheme"]),
                "difference": float(other["loss"] - best["loss"]),
                "ci_low": low,
                "ci_high": high,
            }
        if not (low > 0):  # the interval reaches 0: not better beyond the seeds' spread
            noise.append(str(other["scheme"]))
    if len(noise) > 1:
        caveats.append(f"differences are within noise: any of {', '.join(noise)}")
    if seeds < 5:
        caveats.append(f"only {seeds} seeds per cell")
    if facts["all_diverge_lrs"]:
        caveats.append(f"all schemes diverge at lr {', '.join(f'{x:.3g}' for x in facts['all_diverge_lrs'])}")
    if len(skipped):
        caveats.append(
            "left out after the screen: " + "; ".join(f"{r.scheme} ({r.flags})" for r in skipped.itertuples())
        )
    lrs = best["good_lrs"] or [best["best_lr"]]
    lr_text = f"{min(lrs):.3g}" if len(lrs) == 1 else f"{min(lrs):.3g} to {max(lrs):.3g}"
    if len(noise) > 1:
        head = (
            "No scheme is better than the others beyond the seeds' spread: "
            f"any of {', '.join(noise)} will do; {best['scheme']} had the lowest {facts['metric']} "
            f"({best['loss']:.4g}) at lr {lr_text}."
        )
        recommended = None
    else:
        head = (
            f"Use {best['scheme']} with a learning rate of {lr_text}: its {facts['metric']} is "
            f"{best['loss']:.4g} (95% CI {best['ci_low']:.4g}-{best['ci_high']:.4g}), "
            f"{margin.get('difference', float('nan')):.3g} "
            f"below {margin.get('runner_up', 'the runner-up')} (95% CI of the difference "
            f"{margin.get('ci_low', float('nan')):.3g} to {margin.get('ci_high', float('nan')):.3g})."
        )
        recommended = str(best["scheme"])
    paragraph = head + (" Caveats: " + "; ".join(caveats) + "." if caveats else "")
    return recommended, margin, caveats, paragraph


def advise(req: Request) -> Advice:
    """Screen, sweep within the budget, rank; writes DIR/advice.json, DIR/advise.toml, DIR/report.html."""
    from bench.store import load

    start = time.perf_counter()
    schemes, why = applicable(req)
    table, screen_s = screen(req, schemes)
    for scheme, reason in why.items():
        table = pd.concat(
            [
                table,
                pd.DataFrame([{"scheme": scheme, "flags": f"not applicable: {reason}", "verdict": "n/a"}]),
            ],
            ignore_index=True,
        )
    survivors = list(table.loc[table["verdict"] == "train", "scheme"])
    if not survivors:
        raise UserError(
            f"every scheme's start is pathological on {req.model}: "
            + "; ".join(f"{r.scheme}: {r.flags}" for r in table.itertuples())
        )
    remaining = req.budget_s - (time.perf_counter() - start)
    spec_path = req.out / "advise.toml"
    if spec_path.is_file() and not req.fresh:
        # An earlier advise into this directory (interrupted, or done): resume its sweep as planned.
        text = spec_path.read_text()
        planned = tomllib.loads(text)
        lrs, seeds = planned["grid"]["lr"], len(planned["grid"]["seed"])
        steps, step_s = int(planned["train"]["steps"]), float("nan")
    else:
        # The timing runs cost about a tenth of the budget; the sweep gets what is left after them,
        # less its own fixed cost and 10 % for the report and the ranking.
        lrs, seeds, step_s, fixed = plan(req, survivors, 0.85 * remaining)
        remaining = req.budget_s - (time.perf_counter() - start)
        affordable = int((0.9 * remaining - fixed) / max(step_s, 1e-9))
        if affordable > MAX_STEPS and seeds < MAX_SEEDS:
            # A small model: time left beyond MAX_STEPS buys more seeds (narrower intervals), whose
            # cost grows with them (the step time is per bundle of all seeds).
            more = min(MAX_SEEDS, int(seeds * affordable / MAX_STEPS))
            step_s, seeds = step_s * more / seeds, more
            affordable = int((0.9 * remaining - fixed) / max(step_s, 1e-9))
        steps = max(MIN_STEPS, min(MAX_STEPS, affordable))
        log_every = max(1, steps // PROBES)
        text = spec_text(req, "advise", survivors, lrs, list(range(seeds)), steps, log_every)
        write_atomic(spec_path, text)
    screen_json = req.out / "advice.json"
    write_atomic(screen_json, json.dumps({"screen": json.loads(table.to_json(orient="records"))}, indent=1))
    from bench import runner

    sweep_start = time.perf_counter()
    code = runner.run(spec_path, runner.RunOptions(out=req.out, quiet=True, no_report=True, fresh=req.fresh))
    if code in (130, 143):  # interrupted or terminated: the runner said how to resume
        raise KeyboardInterrupt
    sweep_s = time.perf_counter() - sweep_start
    runs = load(req.out, traces=False).runs
    ranking, facts = rank(runs)
    recommended, margin, caveats, paragraph = conclude(ranking, facts, table, seeds)
    before = sweep_start - start
    if before > 0.4 * req.budget_s:
        # The screen, the applicability check and the timing runs have costs of their own (models
        # built, worker processes started) that a small budget cannot shrink: say what they took.
        tight = (
            f"the budget is tight: checks, screen and timing took {before:.0f} of {req.budget_s:.0f} s, "
            f"leaving {steps} steps for the sweep"
        )
        caveats.append(tight)
        paragraph = paragraph.rstrip(".") + ("; " if "Caveats:" in paragraph else ". Caveats: ") + tight + "."
    best_lrs = [float(x) for x in (ranking.iloc[0]["good_lrs"] if len(ranking) else [])]
    advice = Advice(
        table,
        ranking,
        recommended,
        best_lrs,
        margin,
        caveats,
        paragraph,
        {
            "budget_s": req.budget_s,
            "screen_s": screen_s,
            "sweep_s": sweep_s,
            "step_s": step_s,
            "steps": steps,
            "seeds": seeds,
            "lrs": len(lrs),
        },
    )
    advice.timing["total_s"] = time.perf_counter() - start
    write_atomic(screen_json, json.dumps(advice.to_json(), indent=1, default=_json_default) + "\n")
    runner.write_report(req.out, quiet=True)
    advice.timing["total_s"] = time.perf_counter() - start
    write_atomic(screen_json, json.dumps(advice.to_json(), indent=1, default=_json_default) + "\n")
    return advice


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
