"""initbench: benchmark neural-network weight initialization in PyTorch.

``bench.load(DIR)`` returns a sweep's results as pandas tables;
``bench.summarize(results, by=[...])`` aggregates them over seeds.
"""

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
