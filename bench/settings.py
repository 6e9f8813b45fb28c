"""Torch-free settings a sweep carries besides its jobs: metric thresholds and runtime choices.

They sit at the bottom of the import graph, so metrics, the report and the regression gate can
read them without importing PyTorch. ``bench.spec`` validates them from TOML; a sweep stores
the validated values with its results (``metrics_from``), and readers rebuild them from there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class MetricsConfig:
    """Thresholds that turn curves into metrics and pathology flags (see README)."""

    target_ratio: float = 0.1  # converged: train loss <= target_ratio x its initial value
    target_loss: float | None = None  # or an absolute target, when given
    divergence_ratio: float = 10.0  # diverged: loss non-finite or > divergence_ratio x initial
    spike_ratio: float = 2.0  # a spike: logged loss > spike_ratio x the best logged loss so far
    vanishing_ratio: float = 1e-2  # grad_ratio_init below this: vanishing gradients
    exploding_ratio: float = 1e2  # grad_ratio_init above this: exploding gradients
    # act_ratio_init is a ratio of variances, so these are the gradient thresholds squared
    vanishing_act_ratio: float = 1e-4  # act_ratio_init below this: vanishing activations
    exploding_act_ratio: float = 1e4  # act_ratio_init above this (or non-finite activations): exploding
    weight_growth_max: float = 10.0  # weight_growth above this: exploding weights
    dead_max: float = 0.5  # dead_frac_init or dead_frac_final above this: dead units
    symmetric_max: float = 0.5  # symmetric_frac_final above this: symmetric units
    stall_ratio: float = 0.9  # best loss above stall_ratio x min(initial, null loss): stalled


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how to run; command-line flags override these."""

    devices: str = "auto"
    jobs: int = 0  # 0: choose from the devices and the number of bundles
    backend: str = "loky"
    max_bundle: int = 64  # at most this many jobs trained as one stacked model
    memory_mb: float = 2048.0  # and at most this much estimated training memory per bundle


def metrics_from(stored: dict[str, Any] | None) -> MetricsConfig:
    """The MetricsConfig a sweep stored (``asdict``); defaults for keys it lacks (an older store)."""
    known = {f.name for f in fields(MetricsConfig)}
    return MetricsConfig(**{k: v for k, v in (stored or {}).items() if k in known})


def metrics_dict(cfg: MetricsConfig) -> dict[str, Any]:
    """What a sweep stores of its MetricsConfig (JSON-ready)."""
    return asdict(cfg)
