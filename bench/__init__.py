"""initbench: benchmark neural-network weight initialization in PyTorch.

``bench.load(DIR)`` returns a sweep's results as pandas tables;
``bench.summarize(results, by=[...])`` aggregates them over seeds.
"""

import os

# Idle OpenMP threads sleep instead of spinning (set before torch is first imported; a user's own
# setting wins). On a shared or busy machine, spinning threads waiting for a descheduled partner
# made a bundle 20-40x slower in our measurements (docs/performance.md); on an idle one the cost
# of waking is small next to a step.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
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
