"""The registry of weight-initialization schemes.

Every scheme shares one interface, ``apply(model, ctx)``, so data-dependent
schemes (LSUV) get their batch the same way as the others get nothing: through
:class:`InitContext`. Most schemes are per-layer functions in the style of
``torch.nn.init``: in place, under ``torch.no_grad()``, names ending in ``_``.

Conventions (see README "Init schemes"):

- ``default`` calls each layer's own ``reset_parameters()``, so it draws exactly
  what PyTorch's layer constructors draw, and a change in PyTorch shows up.
- Kaiming schemes use the activation's gain (:func:`activation_gain`).
- Xavier and orthogonal use gain 1 unless ``[init_params.<scheme>] gain`` says
  otherwise (a number, or ``"activation"``): Glorot & Bengio's scheme.
- Named schemes zero the biases unless ``init_bias`` says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bench.errors import UserError, is_number
from bench.train import activations

BIAS_MODES = ("auto", "zeros", "default")

def activation_gain(activation: str) -> float:
    """The gain Kaiming schemes use for ``activation`` (the activation registry's ``gain``).

    ``torch.nn.init.calculate_gain`` where PyTorch defines one (sqrt(2) for relu,
    5/3 for tanh, 3/4 for selu, 1 for sigmoid and linear, sqrt(2 / (1 + 0.01^2))
    for leaky_relu); for gelu, which PyTorch lacks, 1 / sqrt(E[gelu(z)^2]) ~= 1.534,
    which fixes a unit second moment (README, "Gains": an unstable fixed point).
    """
    return activations.get(activation).gain


@dataclass(frozen=True)
class InitContext:
    """What a scheme may use: the activation, its parameters and, for data-dependent ones, a batch."""

    activation: str
    params: dict[str, Any] = field(default_factory=dict)
    data: torch.Tensor | None = None  # a batch of training inputs (LSUV and friends)
    forward: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]] | None = None  # per-layer outputs


@dataclass(frozen=True)
class Scheme:
    """A registry entry: how to initialize, its parameters' defaults, whether biases are zeroed."""

    apply: Callable[[nn.Module, InitContext], None]
    params: dict[str, Any]
    named: bool = True  # named schemes zero biases under init_bias = "auto"
    data_dependent: bool = False  # reads ctx.data: biases are set before it runs, not after
    doc: str = ""


def layers(model: nn.Module) -> list[nn.Module]:
    """The layers a scheme initializes: every module with a ``weight`` of two or more dims."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2]


def _per_layer(fn: Callable[[torch.Tensor, InitContext], None]) -> Callable[[nn.Module, InitContext], None]:
    def apply(model: nn.Module, ctx: InitContext) -> None:
        with torch.no_grad():
            for layer in layers(model):
                fn(layer.weight, ctx)

    return apply


def _gain(ctx: InitContext) -> float:
    gain = ctx.params.get("gain", "activation")
    return activation_gain(ctx.activation) if gain == "activation" else float(gain)


def _kaiming_std(w: torch.Tensor, ctx: InitContext) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    return _gain(ctx) / math.sqrt(fan_in if ctx.params.get("mode", "fan_in") == "fan_in" else fan_out)


def kaiming_normal_(w: torch.Tensor, ctx: InitContext) -> None:
    """N(0, gain^2 / fan): He et al. 2015 with the activation's gain."""
    w.normal_(0.0, _kaiming_std(w, ctx))


def kaiming_uniform_(w: torch.Tensor, ctx: InitContext) -> None:
    """U(+-gain * sqrt(3 / fan)): the same variance as kaiming_normal."""
    bound = math.sqrt(3.0) * _kaiming_std(w, ctx)
    w.uniform_(-bound, bound)


def xavier_uniform_(w: torch.Tensor, ctx: InitContext) -> None:
    """Glorot & Bengio's normalized init, U(+-gain * sqrt(6 / (fan_in + fan_out)))."""
    nn.init.xavier_uniform_(w, gain=_gain(ctx))


def xavier_normal_(w: torch.Tensor, ctx: InitContext) -> None:
    """N(0, gain^2 * 2 / (fan_in + fan_out))."""
    nn.init.xavier_normal_(w, gain=_gain(ctx))


def orthogonal_(w: torch.Tensor, ctx: InitContext) -> None:
    """A (semi-)orthogonal matrix times gain (Saxe et al. 2013)."""
    nn.init.orthogonal_(w, gain=_gain(ctx))


def zeros_(w: torch.Tensor, ctx: InitContext) -> None:
    """All zeros: the classic failure (symmetry is never broken)."""
    w.zero_()


def scaled_normal_(w: torch.Tensor, ctx: InitContext) -> None:
    """N(0, std^2) with a fixed std, independent of fan-in (e.g. BERT/GPT's 0.02)."""
    w.normal_(0.0, float(ctx.params["std"]))


def mean_field_(w: torch.Tensor, ctx: InitContext) -> None:
    """N(0, sigma_w2 / fan_in): the mean-field parametrization (Poole et al. 2016)."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(w)
    w.normal_(0.0, math.sqrt(float(ctx.params["sigma_w2"]) / fan_in))


def _default(model: nn.Module, ctx: InitContext) -> None:
    # Each layer's own reset_parameters: whatever this PyTorch version draws. The root is
    # skipped when it has children (a model's own reset_parameters may reset them again), but
    # not when it is itself a bare layer (apply(nn.Linear(...), "default") must redraw it).
    for module in model.modules():
        if hasattr(module, "reset_parameters") and (module is not model or not any(model.children())):
            module.reset_parameters()


def _lsuv(model: nn.Module, ctx: InitContext) -> None:
    # Mishkin & Matas 2015: orthonormal start, then rescale each layer in order until its
    # output variance on the data batch is within tol of 1.
    if ctx.data is None or ctx.forward is None:
        raise UserError("init 'lsuv' needs a data batch; it is data-dependent")
    tol, max_iter = float(ctx.params["tol"]), int(ctx.params["max_iter"])
    with torch.no_grad():
        for layer in layers(model):
            nn.init.orthogonal_(layer.weight)
        for i, layer in enumerate(layers(model)):
            for _ in range(max_iter):
                var = ctx.forward(model, ctx.data)[i].var().item()
                if not math.isfinite(var) or var == 0 or abs(var - 1.0) < tol:
                    break
                layer.weight.div_(math.sqrt(var))


INITS: dict[str, Scheme] = {
    "default": Scheme(_default, {}, named=False, doc="each layer's own reset_parameters()"),
    "kaiming_uniform": Scheme(_per_layer(kaiming_uniform_), {"gain": "activation", "mode": "fan_in"}),
    "kaiming_normal": Scheme(_per_layer(kaiming_normal_), {"gain": "activation", "mode": "fan_in"}),
    "xavier_uniform": Scheme(_per_layer(xavier_uniform_), {"gain": 1.0}),
    "xavier_normal": Scheme(_per_layer(xavier_normal_), {"gain": 1.0}),
    "orthogonal": Scheme(_per_layer(orthogonal_), {"gain": 1.0}),
    "zeros": Scheme(_per_layer(zeros_), {}),
    "scaled_normal": Scheme(_per_layer(scaled_normal_), {"std": 0.02}),
    "mean_field": Scheme(_per_layer(mean_field_), {"sigma_w2": 2.0, "sigma_b2": 0.0}),
    "lsuv": Scheme(_lsuv, {"tol": 0.1, "max_iter": 10}, data_dependent=True),
}


def scheme(name: str) -> Scheme:
    """Look up a scheme by name; unknown names fail loudly with the choices."""
    try:
        return INITS[name]
    except KeyError:
        raise UserError(f"unknown init {name!r}; choose from {sorted(INITS)}") from None


def check_param(name: str, key: str, value: Any, where: str) -> Any:
    """Validate one scheme parameter from a spec."""
    defaults = scheme(name).params
    if key not in defaults:
        raise UserError(f"{where}: unknown key {key!r} for init {name!r}; choose from {sorted(defaults)}")
    if key == "gain" and value == "activation":
        return value
    if key == "mode":
        if value not in ("fan_in", "fan_out"):
            raise UserError(f"{where} = {value!r}: choose from ['fan_in', 'fan_out']")
        return value
    if not is_number(value):
        extra = " or 'activation'" if key == "gain" else ""
        raise UserError(f"{where} = {value!r}: expected a number{extra}")
    if key == "max_iter" and value != int(value):  # int() would silently truncate 2.5 to 2
        raise UserError(f"{where} = {value!r}: expected an integer >= 1")
    positive = key in ("std", "tol", "max_iter")
    if value < 0 or (value == 0 and positive):
        raise UserError(f"{where} = {value!r}: must be {'>' if positive else '>='} 0")
    return int(value) if key == "max_iter" else float(value)


def resolve_params(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """A scheme's full parameter set: its defaults overlaid with what the spec gives."""
    return {**scheme(name).params, **given}


def apply(model: nn.Module, name: str, ctx: InitContext, init_bias: str | float = "auto") -> None:
    """Initialize ``model`` in place with scheme ``name``.

    Args:
        model: built by :mod:`bench.train.models`; its constructors have already drawn
            PyTorch's defaults (whose biases ``init_bias = "default"`` keeps).
        name: a key of :data:`INITS`.
        ctx: activation, scheme parameters and (for data-dependent schemes) a batch.
        init_bias: ``"auto"`` (zeros for named schemes, the layer's own draw for
            ``default``; ``sigma_b2`` for ``mean_field``), ``"zeros"``, ``"default"``
            or a constant.
    """
    entry = scheme(name)
    # Fill in the scheme's defaults, so a caller that passes no params gets the documented
    # scheme (xavier/orthogonal gain 1, not _gain's fallback to the activation's gain).
    ctx = replace(ctx, params=resolve_params(name, ctx.params))
    biased = [m for m in layers(model) if isinstance(getattr(m, "bias", None), torch.Tensor)]
    drawn = [m.bias.detach().clone() for m in biased]

    @torch.no_grad()
    def set_biases() -> None:
        for module, original in zip(biased, drawn, strict=True):
            if init_bias == "default":
                # The layer's own draw: the constructor's for named schemes; `default` has just
                # redrawn it together with the weight, and keeps that draw (as under "auto").
                if entry.named:
                    module.bias.copy_(original)
            elif init_bias == "zeros" or (init_bias == "auto" and entry.named):
                module.bias.zero_()
                if name == "mean_field" and init_bias == "auto":
                    module.bias.normal_(0.0, math.sqrt(float(ctx.params["sigma_b2"])))
            elif not isinstance(init_bias, str):
                module.bias.fill_(float(init_bias))

    if entry.data_dependent:
        # LSUV scales each layer to unit output variance: it must see the final biases, or
        # zeroing them afterwards shifts every variance it has just normalized.
        set_biases()
        entry.apply(model, ctx)
    else:
        entry.apply(model, ctx)
        set_biases()
