"""Probe statistics: what the engines measure of every layer at the probe steps.

Per layer and kind (weight, bias, act, preact; ``bench.schema``): mean, std, absmax, norm,
gradient norm, dead fraction, and each hidden layer's unit diversity (``distinct_frac``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.schema import KINDS, STATS


def stats(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mean, std, absmax, norm of each job's slice of ``t`` (K, ...) -> (K, 4), accumulated in ``dtype``.

    Four streaming reductions and no temporaries: torch.std on CPU is about 20x slower, and a
    two-pass std allocates a copy of every activation. The std comes from the norm and the mean;
    its cancellation error is ~1e-7 x (mean / std)^2 in float32, far below what the probes resolve.
    A float32 sum of squares overflows once entries pass ~1e17 (an exploding net at step 0);
    :func:`probe` then redoes the step in float64 (10x slower, so only then).
    """
    flat = t.detach().flatten(1)
    n = flat.shape[1]
    mean = flat.mean(1, dtype=dtype)
    norm = torch.linalg.vector_norm(flat, dim=1, dtype=dtype)
    absmax = torch.maximum(flat.amax(1), -flat.amin(1)).to(dtype)
    if n > 1:
        std = ((norm * norm - n * mean * mean).clamp_min(0) / (n - 1)).sqrt()
    else:  # the std of a single value (a one-unit output bias) is undefined: NaN, as torch.std says
        std = torch.full_like(mean, float("nan"))
    return torch.stack([mean, std, absmax, norm], dim=1)


def _rms_norm(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """RMS over the batch of each sample's vector norm: (K, batch, width) -> (K,)."""
    return t.detach().to(dtype).pow(2).sum(-1).mean(-1).sqrt()


_PROJECTIONS: dict[tuple[int, str], torch.Tensor] = {}
DISTINCT_RTOL = 1e-5  # two units are copies when their projections agree to this x the layer's largest


def distinct_frac(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fraction of a layer's units that are not copies of another unit: (K, in, out), (K, out) -> (K,).

    Unit j is its incoming weights and bias, ``[w[:, :, j], b[:, j]]``. A unit is a copy when it agrees
    with an earlier unit of its layer to ``DISTINCT_RTOL`` relative to the layer's scale, compared
    through four fixed random projections (one matvec per layer, not a pairwise distance over all
    fan_in coordinates; two distinct random units agree on all four with probability ~1e-19). Units
    that start equal get equal gradients and stay copies (float rounding keeps them within the
    tolerance), so a width-n layer then computes what a narrower one would: 1/n for n clones.
    """
    units = torch.cat([w.detach().transpose(1, 2), b.detach().unsqueeze(-1)], dim=2)  # (K, out, in + 1)
    key = (units.shape[2], str(units.device))
    if key not in _PROJECTIONS:
        g = torch.Generator().manual_seed(0)
        _PROJECTIONS[key] = torch.randn(units.shape[2], 4, generator=g).to(units.device)
    proj = (units @ _PROJECTIONS[key].to(units.dtype)).double()  # (K, out, 4)
    n = proj.shape[1]
    tol = DISTINCT_RTOL * proj.abs().flatten(1).amax(1)
    close = torch.cdist(proj, proj, p=float("inf")) <= tol[:, None, None]
    earlier = torch.ones(n, n, dtype=torch.bool, device=proj.device).tril(-1)  # [j, i]: i < j
    copies = (close & earlier).any(dim=2).sum(1)
    return (n - copies).to(torch.float32) / n


def probe(out: torch.Tensor, grad_norm: torch.Tensor, W: list, B: list, record: list, *,
           units: bool) -> None:
    """Fill one probe step's stats ``out`` (K, depth, kinds, stats) and whole-gradient norms (K,).

    ``units``: also measure each hidden layer's unit diversity (``distinct_frac``), which the
    metrics read at step 0 and at the last logged step only.
    """
    _fill_probe(out, grad_norm, W, B, record, torch.float32)
    # Statistics of a finite tensor stay finite: where float32 sums overflowed (finite absmax,
    # non-finite mean, std or norm), the jobs concerned are measured again in float64.
    first4 = out[..., :4]
    redo = (torch.isfinite(first4[..., 2]) & ~torch.isfinite(first4).all(-1)).flatten(1).any(1)
    if bool(redo.any()):
        wide = torch.full_like(out, float("nan"), dtype=torch.float64)
        wide_grad = torch.zeros_like(grad_norm, dtype=torch.float64)
        _fill_probe(wide, wide_grad, W, B, record, torch.float64)
        out[redo] = wide[redo].to(out.dtype)
        grad_norm[redo] = wide_grad[redo].to(grad_norm.dtype)
    if units:
        w_kind, col = KINDS.index("weight"), STATS.index("distinct_frac")
        for i in range(len(W) - 1):  # hidden layers; output units are not interchangeable
            out[:, i, w_kind, col] = distinct_frac(W[i], B[i])


def _fill_probe(out: torch.Tensor, grad_norm: torch.Tensor, W: list, B: list, record: list,
                dtype: torch.dtype) -> None:
    sq = torch.zeros(out.shape[0], device=out.device, dtype=dtype)
    for i, (w, b) in enumerate(zip(W, B)):
        for kind, p in ((0, w), (1, b)):
            out[:, i, kind, :4] = stats(p, dtype)
            g = torch.linalg.vector_norm(p.grad.flatten(1), dim=1, dtype=dtype)
            out[:, i, kind, 4] = g
            sq += g**2
        z, h = record[i]
        out[:, i, 3, :4] = stats(z, dtype)
        # Activation "norm" is the RMS over the batch of each sample's vector norm.
        out[:, i, 3, 3] = _rms_norm(z, dtype)
        if h is not None:
            out[:, i, 2, :4] = stats(h, dtype)
            out[:, i, 2, 3] = _rms_norm(h, dtype)
            out[:, i, 2, 6] = (h.detach() == 0).all(dim=1).float().mean(-1)
    grad_norm.copy_(sq.sqrt())


def catalog(model: nn.Module, order: list[str] | None = None) -> list[dict]:
    """The module catalog of a model: every module that holds parameters of its own, or has no
    children (an activation, whose output a probe describes), as ``schema.MODULE_COLUMNS`` rows.

    Args:
        model: the model, as built for a job.
        order: module names in the order the forward pass calls them; modules it does not list
            follow in ``named_modules()`` order (for an ``nn.Sequential`` that is the forward order).

    Fans are PyTorch's (``nn.init._calculate_fan_in_and_fan_out``) of the module's ``weight``, or
    of its first parameter with two or more dimensions; NaN when it has none.
    """
    rows = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not name or (not own and any(True for _ in module.children())):
            continue
        shapes = ";".join(f"{p}={'x'.join(map(str, t.shape)) or '1'}" for p, t in own)
        weight = dict(own).get("weight")
        if weight is None or weight.dim() < 2:
            weight = next((t for _, t in own if t.dim() >= 2), None)
        fan_in, fan_out = (nn.init._calculate_fan_in_and_fan_out(weight) if weight is not None
                           else (math.nan, math.nan))
        rows.append({"name": name, "type": type(module).__name__, "shapes": shapes,
                     "fan_in": float(fan_in), "fan_out": float(fan_out)})
    rank = {n: i for i, n in enumerate(order or [])}
    rows.sort(key=lambda r: rank.get(r["name"], len(rank)))  # stable: the rest keep their order
    for i, row in enumerate(rows):
        row["index"] = i
    return rows
