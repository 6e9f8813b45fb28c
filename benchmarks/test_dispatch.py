"""Dispatch overhead per bundle: trivially small jobs through ``bench.dispatch.execute``.

specs/tiny.toml: 16 jobs of width 4 and 1 step, one bundle each (max_bundle = 1), so the
time is what a bundle costs besides training: building the models, turning the arrays
into JobResults (metrics, tables) and, with workers, pickling them back. In-process and
with 2 loky workers (the pool is reused between rounds, so round 1 is the cold start:
2 workers importing torch). ``engine_only`` times ``engine.train`` on the same bundles.
"""

from __future__ import annotations

import pytest

from bench import dispatch, planner, spec
from bench.train import stacked as engine
from benchmarks.conftest import SPECS, interleaved, median, record


@pytest.mark.parametrize("workers", [0, 2])
def test_dispatch_overhead(benchmark, workers):
    sweep = spec.load(SPECS / "tiny.toml")
    bundles = planner.plan(sweep.jobs(), ["cpu"], max_bundle=sweep.runtime.max_bundle,
                           workers=max(workers, 1))

    def run() -> None:
        results = list(dispatch.execute(bundles, sweep.metrics, workers=workers))
        assert len(results) == len(bundles)  # one result per tiny job, none failed or lost

    def engine_only() -> None:
        for b in bundles:
            engine.train(list(b.jobs))

    # No warm-up round: with workers, round 1 is the pool's cold start, reported on its own.
    total, bare = interleaved(benchmark, run, engine_only, rounds=4, warmup_rounds=0)
    warm = total[1:] if workers else total
    n = len(bundles)
    record(benchmark, workers=workers, bundles=n, cold_s=total[0], per_bundle_ms=1e3 * median(warm) / n,
           engine_only_per_bundle_ms=1e3 * median(bare) / n,
           overhead_per_bundle_ms=1e3 * (median(warm) - median(bare)) / n)
