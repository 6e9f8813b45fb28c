"""The statistics of ``bench.regress``: watched metrics, tolerances, tests, and the verdict per cell.

A *cell* is one grid point with the seed left out; its seeds are a sample. For
every cell and watched metric the baseline's seeds are compared with the
current seeds (the same seeds, other seeds, or a different number of them). A
change counts only when it is

- **real**: a two-sided test gives a Benjamini-Hochberg q-value <= ``alpha``
  over all cells x metrics of the check. Continuous metrics use a moderated
  t-test on the metric's scale (log for losses, steps and ratios): each cell's
  seed variance is shrunk towards the variance typical of the metric across
  cells (Smyth 2004, as limma does for experiments with 2-3 replicates), never
  below the cell's own, and never below the rounding of the values (steps come
  in multiples of ``log_every``). The success rate uses Fisher's exact test.
- **large**: the medians differ by more than the metric's tolerance
  (``"10%"``: relative to the baseline median; a plain number: absolute).

A real and large change in the worse direction is a regression, in the better
direction an improvement; for the ``changed`` metrics (``act_ratio_init``,
``dead_frac_init``, ...) any real and large change is a regression. One rule
overrides the statistics: when seeds present on both sides converged in the
baseline and now fail (never reach the target, diverge or crash) in a majority
of them, the cell has regressed. docs/ci.md gives the reasons and the measured
false-alarm rate and power.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special, stats

from bench.policy import (  # noqa: F401  (re-exported: the statistics' vocabulary)
    ALPHA,
    DEFAULT_METRICS,
    METRICS,
    STORED,
    SUCCESS,
    Metric,
    Policy,
    Tolerance,
    metric_named,
    parse_table,
    parse_tolerance,
)

# The pooled variance counts as at most this many extra degrees of freedom. Cells' seed variances
# differ tenfold (a deep net at a high learning rate is noisier), and borrowing more from the
# quieter cells raised the measured false-alarm rate with 2 seeds from 1% to 5% (docs/ci.md).
PRIOR_DF_MAX = 2.0


# --- the samples ---------------------------------------------------------------------
@dataclass
class Cell:
    """One grid cell's seeds: statuses and per-seed metric values (NaN where undefined)."""

    key: str
    settings: dict[str, Any]
    seeds: list[int]
    status: list[str]
    values: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def success(self) -> np.ndarray:
        """Per seed: reached the target and did not diverge (crashed seeds count as failures)."""
        steps = np.asarray(self.values.get("steps_to_target", [math.nan] * len(self.seeds)), dtype=float)
        return (np.asarray(self.status) == "ok") & np.isfinite(steps)

    def sample(self, metric: str) -> np.ndarray:
        """The finite values of a metric over the seeds that did not crash (success: 0/1 per seed)."""
        ran = np.asarray(self.status) != "failed"
        if metric == SUCCESS:
            return self.success()[ran].astype(float)
        values = np.asarray(self.values.get(metric, [math.nan] * len(self.seeds)), dtype=float)[ran]
        return values[~np.isnan(values)]


# --- the tests -----------------------------------------------------------------------
def pooled_variance(baseline: np.ndarray, current: np.ndarray) -> tuple[float, int]:
    """Within-cell seed variance pooled over both sides, and its degrees of freedom."""
    df = len(baseline) + len(current) - 2
    if df < 1:
        return math.nan, 0
    ss = sum(float(((x - x.mean()) ** 2).sum()) for x in (baseline, current) if len(x))
    return ss / df, df


def _trigamma_inverse(x: float) -> float:
    # Newton's method as in limma's trigammaInverse (Smyth 2004).
    if x > 1e7:
        return 1 / math.sqrt(x)
    if x < 1e-6:
        return 1 / x
    y = 0.5 + 1 / x
    for _ in range(50):
        tri = float(special.polygamma(1, y))
        step = tri * (1 - tri / x) / float(special.polygamma(2, y))
        y += step
        if -step / y < 1e-8:
            break
    return y


def variance_prior(variances: np.ndarray, dfs: np.ndarray) -> tuple[float, float]:
    """Prior (d0, s0^2) for the cells' seed variances of one metric, by limma's moment estimator.

    Cells with 2-3 seeds estimate their variance badly; the moderated t-test shrinks each
    towards the variance typical of the metric across cells, with a weight ``d0`` (in degrees
    of freedom) that is large when the cells' variances agree and small when they differ.
    Cells without spread (deterministic quantities) do not inform the prior. ``d0`` is capped
    at the total degrees of freedom the cells hold; (0, 0) when fewer than 3 cells have spread.
    """
    ok = np.isfinite(variances) & (variances > 0) & (dfs > 0)
    if ok.sum() < 3:
        return 0.0, 0.0
    var, df = variances[ok], dfs[ok].astype(float)
    e = np.log(var) - special.digamma(df / 2) + np.log(df / 2)
    mean = float(e.mean())
    spread = float(e.var(ddof=1) - special.polygamma(1, df / 2).mean())
    cap = min(float(df.sum()), PRIOR_DF_MAX)
    d0 = min(2 * _trigamma_inverse(spread), cap) if spread > 0 else cap
    if not d0 > 0:
        return 0.0, 0.0
    return d0, math.exp(mean + special.digamma(d0 / 2) - math.log(d0 / 2))


def moderated_p(baseline: np.ndarray, current: np.ndarray, d0: float, s0: float, floor: float = 0.0) -> float:
    """Two-sided moderated t-test p-value (Smyth 2004); NaN without a variance to use.

    With ``d0 = 0`` this is Student's t-test. Two samples without spread and no prior
    (a deterministic quantity) give p = 0 when their means differ and 1 when they agree:
    the tolerance then decides alone.
    """
    if not len(baseline) or not len(current):
        return math.nan
    var, df = pooled_variance(baseline, current)
    if df == 0 and d0 == 0:
        return math.nan
    diff = float(current.mean() - baseline.mean())
    if diff == 0:
        return 1.0
    own = max(var, floor) if df else floor
    moderated = (d0 * s0 + df * own) / (d0 + df)
    # Never below the cell's own variance: a noisy cell (deep, high learning rate) must not borrow
    # the calm of the others. The prior still adds its degrees of freedom.
    moderated = max(moderated, own)
    se = math.sqrt(moderated * (1 / len(baseline) + 1 / len(current)))
    if se == 0 or not math.isfinite(diff):
        return 0.0
    return float(2 * stats.t.sf(abs(diff) / se, d0 + df))


def fisher_p(baseline: np.ndarray, current: np.ndarray) -> float:
    """Two-sided Fisher exact p-value for two 0/1 samples (success counts)."""
    if not len(baseline) or not len(current):
        return math.nan
    sb, sc = int(baseline.sum()), int(current.sum())
    table = [[sb, len(baseline) - sb], [sc, len(current) - sc]]
    return float(stats.fisher_exact(table).pvalue)


def bh(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg q-values; NaN p-values stay NaN and do not count as tests."""
    p = np.asarray(pvalues, dtype=float)
    q = np.full(len(p), math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    if len(tested):
        order = tested[np.argsort(p[tested], kind="stable")]
        scaled = p[order] * len(tested) / np.arange(1, len(tested) + 1)
        q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def _log(x: np.ndarray) -> np.ndarray:
    return np.log(np.clip(x, 1e-300, 1e300))  # 0 and inf ratios stay testable, as extreme values


@dataclass
class Comparison:
    """One cell x metric: the two samples' summaries, the change, the evidence, the verdict."""

    key: str
    metric: str
    baseline: float  # median (success: rate)
    current: float
    n_baseline: int
    n_current: int
    change: float  # signed: fraction of the baseline for relative tolerances, else a difference
    tolerance: Tolerance
    p: float = math.nan
    q: float = math.nan
    verdict: str = "unchanged"  # regression | improvement | unchanged | untested
    message: str = ""
    samples: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))  # on the test's scale
    floor: float = 0.0  # least seed variance on the test's scale: the values' rounding (steps of log_every)


def compare_metric(metric: Metric, tolerance: Tolerance, baseline: Cell, current: Cell) -> Comparison:
    """Summaries and change of one metric of one cell (p, q and verdict come in :func:`decide`)."""
    b, c = baseline.sample(metric.name), current.sample(metric.name)
    center = np.mean if metric.name == SUCCESS else np.median
    mb, mc = (float(center(x)) if len(x) else math.nan for x in (b, c))
    change = tolerance.change(mc, mb) if len(b) and len(c) else math.nan
    samples = (_log(b), _log(c)) if metric.log else (b, c)
    return Comparison(baseline.key, metric.name, mb, mc, len(b), len(c), change, tolerance, samples=samples,
                      floor=_rounding_variance(metric, baseline.settings, np.concatenate([b, c])))


def _rounding_variance(metric: Metric, settings: Mapping[str, Any], values: np.ndarray) -> float:
    # A value known only to a step q is uniform over a width q: variance q^2 / 12, which on the
    # log scale is (q / x)^2 / 12. Without this floor, two seeds that both hit the target at
    # step 30 would look like a deterministic quantity and any move would be "certain".
    step = settings.get(metric.step) if isinstance(metric.step, str) else metric.step
    if not step or not len(values):
        return 0.0
    if metric.log:
        values = values[values > 0]
        return float(np.mean((float(step) / values) ** 2) / 12) if len(values) else 0.0
    return float(step) ** 2 / 12


def paired_flips(baseline: Cell, current: Cell) -> str | None:
    """The rule that overrides statistics: a majority of shared seeds went converged -> failed."""
    common = sorted(set(baseline.seeds) & set(current.seeds))
    if not common:
        return None
    ok_b = dict(zip(baseline.seeds, baseline.success()))
    ok_c = dict(zip(current.seeds, current.success()))
    status = dict(zip(current.seeds, current.status))
    flipped = [s for s in common if ok_b[s] and not ok_c[s]]
    if 2 * len(flipped) <= len(common):
        return None
    how = ", ".join(f"seed {s}: {'never reached the target' if status[s] == 'ok' else status[s]}"
                    for s in flipped)
    return (f"{SUCCESS}: converged in the baseline, failed now in {len(flipped)} of {len(common)} "
            f"shared seeds ({how}); a majority flip is a regression regardless of the statistics")


@dataclass(frozen=True)
class Check:
    """A watched metric's regression check: a change must be real (q <= alpha) and exceed the tolerance.

    :meth:`fails` and :meth:`improves` take a :class:`Comparison`, which carries both sides and the
    q-value (only the whole family of comparisons can give that), and return a message naming the
    metric, both values and the thresholds, or None.
    """

    metric: Metric
    alpha: float

    def _beyond(self, comp: Comparison) -> bool:
        return comp.q <= self.alpha and self.metric.size(comp.change, comp.tolerance) > comp.tolerance.value

    def _message(self, comp: Comparison) -> str:
        return (f"{comp.metric} {_fmt(comp.current)} vs baseline {_fmt(comp.baseline)}: "
                f"{format_change(comp)} exceeds tolerance {comp.tolerance} "
                f"and q = {comp.q:.2g} <= alpha {self.alpha:g}")

    def fails(self, comp: Comparison) -> str | None:
        worse = self.metric.direction == "changed" or self.metric.worse(comp.change)
        return self._message(comp) if worse and self._beyond(comp) else None

    def improves(self, comp: Comparison) -> str | None:
        better = self.metric.direction != "changed" and not self.metric.worse(comp.change)
        return self._message(comp) if better and self._beyond(comp) else None


def decide(comparisons: list[Comparison], metrics: Mapping[str, Metric], alpha: float) -> None:
    """Fill in p (per metric), q (Benjamini-Hochberg over all comparisons) and the verdicts."""
    for name in dict.fromkeys(c.metric for c in comparisons):
        group = [c for c in comparisons if c.metric == name]
        if name == SUCCESS:
            for comp in group:
                comp.p = fisher_p(*comp.samples)
            continue
        pooled = [pooled_variance(*c.samples) for c in group]
        d0, s0 = variance_prior(np.array([max(v, c.floor) for (v, _), c in zip(pooled, group)]),
                                np.array([d for _, d in pooled]))
        for comp in group:
            comp.p = moderated_p(*comp.samples, d0, s0, comp.floor)
    for comp, q in zip(comparisons, bh([c.p for c in comparisons])):
        comp.q = float(q)
        if math.isnan(q):
            comp.verdict, comp.message = "untested", "no values on a side, or no seed spread to test with"
            continue
        check = Check(metrics[comp.metric], alpha)
        if message := check.fails(comp):
            comp.verdict, comp.message = "regression", message
        elif message := check.improves(comp):
            comp.verdict, comp.message = "improvement", message


def format_change(comp: Comparison) -> str:
    if math.isnan(comp.change):
        return "-"
    if comp.tolerance.relative:
        return "inf" if math.isinf(comp.change) else f"{comp.change * 100:+.1f}%"
    return f"{comp.change:+.3g}"


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"
