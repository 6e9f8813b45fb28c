"""initbench: benchmark neural-network weight initialization in PyTorch.

``bench.load(DIR)`` returns a sweep's results as pandas tables;
``bench.summarize(results, by=[...])`` aggregates them over seeds.
"""

import os

# Idle OpenMP threads spin only briefly before they sleep (GNU OpenMP, which Linux torch wheels
# use; read when torch is first imported; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins).
# The default spin made a bundle 20-40x slower on a busy machine, where a spinning thread waits
# for a descheduled partner; sleeping at once (PASSIVE) made every operator pay a wake-up, about
# 1.3x slower on an idle machine. 1000 spins keeps most of both (docs/performance.md, "Load").
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from bench.environment import VERSION as __version__  # noqa: E402 (after the OpenMP setting)

__all__ = ["load", "summarize", "__version__"]


def __getattr__(name: str):
    # Imported on first use: the command-line tools start faster without pandas and torch.
    if name == "load":
        from bench.store import load

        return load
    if name == "summarize":
        from bench.metrics import summarize

        return summarize
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
