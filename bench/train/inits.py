"""The registry of weight-initialization schemes, and init rules by parameter name.

Every scheme shares one interface, ``apply(model, ctx)``, so data-dependent
schemes (LSUV) get their batch the same way as the others get nothing: through
:class:`InitContext`. Most schemes are per-tensor functions in the style of
``torch.nn.init``: in place, under ``torch.no_grad()``, names ending in ``_``.

Conventions (see README "Init schemes"):

- Schemes work **by parameter**, on any module (:func:`parameters` sorts each one into
  a role): every parameter of two or more dims gets the scheme with PyTorch's fans
  (``nn.init._calculate_fan_in_and_fan_out``); a parameter whose name has a ``bias``
  part is a bias; a norm layer's affine pair is set to weight 1, bias 0; any other
  parameter of fewer than two dims keeps what its constructor set.
- ``nn.MultiheadAttention``'s packed ``in_proj_weight`` (3E, E) is initialized as its
  three (E, E) blocks q, k, v, each with the fans of its own matrix.
- ``default`` calls every module's own ``reset_parameters()`` (``_reset_parameters()``
  where that is what its constructor calls), children before parents, so it draws what
  PyTorch's constructors draw, and a change in PyTorch shows up.
- Kaiming schemes use ``gain`` if given, else the activation's gain; a model with no single
  activation (``InitContext.activation is None``) must give one.
- Xavier and orthogonal use gain 1 unless ``[init_params.<scheme>] gain`` says
  otherwise (a number, or ``"activation"``): Glorot & Bengio's scheme.
- Named schemes zero the biases unless ``init_bias`` says otherwise.
- Init rules (:class:`Rule`) run last, in order: a glob over dotted parameter names and a
  scheme, a scale or a constant.

Each scheme's name, parameters and defaults, and the rule syntax, are declared without torch in
:mod:`bench.train.schemes` (what a spec is checked against); :data:`INITS` pairs each declared
name with its implementation here. Adding a scheme: declare it there, implement it here.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bench.errors import UserError
from bench.job import Rule
from bench.train import activations, residual_inits, schemes
from bench.train.schemes import resolve_params

# Norm layers whose affine pair every named scheme sets to (1, 0), as their constructors do.
NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                      *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


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
    """What a scheme may use: the activation, its parameters and, for data-dependent ones, a batch.

    ``activation`` is None when the model has no single activation (a user factory whose job
    sets none): a scheme that needs the activation's gain then asks for an explicit ``gain``.
    """

    activation: str | None
    params: dict[str, Any] = field(default_factory=dict)
    data: torch.Tensor | None = None  # a batch of training inputs (LSUV and friends)
    # How to run the model on ``data`` (its return value is not used: LSUV reads each module's
    # output through forward hooks). None: ``model(data)``.
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None
    # Builds the same architecture at another width (``rebuild(width=...)``), for schemes that compare
    # widths (muP's base shapes); None for the MLP.
    rebuild: Callable[..., nn.Module] | None = None
    # The model's width (d_model: the MLP's hidden width, a factory's ``width`` setting); None when the
    # architecture takes no width setting. small_init's d defaults to it.
    width: int | None = None
    scheme: str = ""  # the scheme being applied, for messages (set by apply)


@dataclass(frozen=True, kw_only=True)
class Scheme(schemes.Declared):
    """A registry entry: a scheme's declaration (:data:`bench.train.schemes.SCHEMES`) and its code."""

    apply: Callable[[nn.Module, InitContext], None]
    tensor: Callable[[torch.Tensor, InitContext], None] | None = None  # the per-tensor form, if any


@dataclass(frozen=True)
class Param:
    """One parameter of a model, as the schemes see it.

    ``role`` is ``"weight"`` (>= 2 dims: the scheme draws it), ``"bias"`` (a name part ``bias``:
    ``init_bias`` decides), ``"norm"`` (a norm layer's affine weight or bias: 1 and 0) or
    ``"other"`` (fewer than 2 dims and not a bias, e.g. a layer-scale or a custom RMSNorm gain:
    left as its constructor set it).
    """

    name: str  # dotted, as model.named_parameters() names it
    owner: nn.Module
    leaf: str  # the attribute name on the owner
    tensor: nn.Parameter
    role: str


def parameters(model: nn.Module) -> list[Param]:
    """Every parameter of ``model`` once, in ``named_parameters()`` order, with its role."""
    out, seen = [], set()
    for prefix, module in model.named_modules():
        for leaf, tensor in module.named_parameters(recurse=False):
            if id(tensor) in seen:  # a shared parameter is initialized once, where it first appears
                continue
            seen.add(id(tensor))
            if isinstance(module, NORMS):
                role = "norm"
            elif "bias" in leaf.split("_"):  # bias, in_proj_bias, bias_k (1, 1, E), bias_ih_l0
                role = "bias"
            else:
                role = "weight" if tensor.dim() >= 2 else "other"
            out.append(Param(f"{prefix}.{leaf}" if prefix else leaf, module, leaf, tensor, role))
    return out


def layers(model: nn.Module) -> list[nn.Module]:
    """Every module with a ``weight`` of two or more dims (an MLP's linear layers, in order)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2]


def _blocks(p: Param) -> Iterator[torch.Tensor]:
    # nn.MultiheadAttention packs q, k and v into one (3E, E) in_proj_weight; each block is a
    # square map of its own, so each gets the fans of an (E, E) matrix (README, "Init schemes").
    if isinstance(p.owner, nn.MultiheadAttention) and p.leaf == "in_proj_weight":
        yield from p.tensor.chunk(3)
    else:
        yield p.tensor


def _init_tensor(p: Param, fn: Callable[[torch.Tensor, InitContext], None], ctx: InitContext) -> None:
    """Draw one parameter with a per-tensor scheme: MHA blocks apart, an Embedding's padding row 0."""
    for block in _blocks(p):
        fn(block, ctx)
    if isinstance(p.owner, nn.Embedding) and p.leaf == "weight" and p.owner.padding_idx is not None:
        p.tensor[p.owner.padding_idx].zero_()  # as nn.Embedding does: the padding row is never trained


def _per_tensor(fn: Callable[[torch.Tensor, InitContext], None]) -> Callable[[nn.Module, InitContext], None]:
    def apply(model: nn.Module, ctx: InitContext) -> None:
        with torch.no_grad():
            for p in parameters(model):
                if p.role == "weight":
                    _init_tensor(p, fn, ctx)

    return apply


def _gain(ctx: InitContext) -> float:
    gain = ctx.params.get("gain", "activation")
    if gain != "activation":
        return float(gain)
    if ctx.activation is None:
        name = ctx.scheme or "<scheme>"
        raise UserError(f"init {name!r} scales by the activation's gain, but this model has no single "
                        f"activation setting; give one: [init_params.{name}] gain = <number>")
    return activation_gain(ctx.activation)


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


def trunc_normal_(w: torch.Tensor, ctx: InitContext) -> None:
    """N(0, std^2) cut at [a std, b std] (bounds in units of std, as TensorFlow and timm's ViT mean them).

    ``torch.nn.init.trunc_normal_`` takes absolute bounds (its default a=-2, b=2 cuts N(0, 0.02^2)
    at 100 std, i.e. not at all), so it is called with a * std, b * std. ``std`` is the untruncated
    normal's, as in torch and TensorFlow: a +-2 cut leaves a std of 0.880 std.
    """
    std = float(ctx.params["std"])
    nn.init.trunc_normal_(w, 0.0, std, float(ctx.params["a"]) * std, float(ctx.params["b"]) * std)


def _resets(model: nn.Module) -> Iterator[nn.Module]:
    # Children before parents, as constructors run: a parent's reset (nn.MultiheadAttention zeroing
    # out_proj.bias, nn.Transformer's Xavier) comes after its children's own draws.
    seen: set[int] = set()

    def visit(module: nn.Module) -> Iterator[nn.Module]:
        if id(module) in seen:
            return
        seen.add(id(module))
        for child in module.children():
            yield from visit(child)
        yield module

    yield from visit(model)


def _default(model: nn.Module, ctx: InitContext) -> None:
    # Each module's own reset: whatever this PyTorch version draws. nn.MultiheadAttention and
    # nn.Transformer call theirs _reset_parameters; a module with neither keeps its constructor's values.
    # A tensor two modules share (a head tied to the embedding) keeps the value it was built with:
    # resetting both would leave whichever reset ran last (the head's U(+-1/sqrt(d)) over the
    # embedding's N(0, 1)), while tying in a constructor keeps the tensor of the module it came from.
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    tied = {id(p): p.detach().clone() for p in model.parameters() if owners[id(p)] > 1}
    for module in _resets(model):
        reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if callable(reset):
            reset()
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in tied:
                p.copy_(tied[id(p)])


def _lsuv_units(model: nn.Module) -> dict[nn.Module, list[torch.Tensor]]:
    """LSUV's units: each module with weights of its own, and the tensors that scale its output.

    A module's output is taken as homogeneous in its own >= 2-dim weights (one for Linear, Conv,
    Embedding). nn.MultiheadAttention's output is linear in out_proj.weight (q and k sit inside
    the softmax), so that is what scales it.
    """
    units: dict[nn.Module, list[torch.Tensor]] = {}
    for p in parameters(model):
        if p.role == "weight":
            units.setdefault(p.owner, []).append(p.tensor)
    for module in units:
        if isinstance(module, nn.MultiheadAttention):
            units[module] = [module.out_proj.weight]
    return units


def _lsuv(model: nn.Module, ctx: InitContext) -> None:
    # Mishkin & Matas 2015: orthonormal start, then rescale each unit in forward order until its
    # output variance on the data batch is within tol of 1. Outputs are read by forward hooks, so
    # any module works; a unit the forward never calls (out_proj inside attention) is not rescaled.
    if ctx.data is None:
        raise UserError("init 'lsuv' needs a data batch; it is data-dependent")
    tol, max_iter = float(ctx.params["tol"]), int(ctx.params["max_iter"])
    run = ctx.forward or (lambda m, x: m(x))
    units = _lsuv_units(model)
    seen: dict[nn.Module, torch.Tensor] = {}  # each unit's output on its first call of a forward

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if module not in seen:
            seen[module] = output[0] if isinstance(output, tuple) else output

    handles = [m.register_forward_hook(hook) for m in units]
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # BatchNorm's running stats
    try:
        with torch.no_grad():
            for p in parameters(model):
                if p.role == "weight":  # gain 1 whatever the params say: LSUV sets the scale itself
                    _init_tensor(p, lambda w, _: nn.init.orthogonal_(w), ctx)
            run(model, ctx.data)
            order = [m for m in seen if torch.is_tensor(seen[m])]  # dicts keep the first-call order
            for module in order:
                scaled = units[module]
                for _ in range(max_iter):
                    seen.clear()
                    run(model, ctx.data)
                    var = seen[module].var().item()
                    if not math.isfinite(var) or var == 0 or abs(var - 1.0) < tol:
                        break
                    for t in scaled:  # homogeneous of degree len(scaled): each takes its root
                        t.div_(math.sqrt(var) ** (1 / len(scaled)))
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def _residual(name: str) -> Callable[[nn.Module, InitContext], None]:
    """A residual-aware scheme of bench.train.residual_inits as a registry entry."""
    def apply(model: nn.Module, ctx: InitContext) -> None:
        scheme = residual_inits.RESIDUAL_INITS[name]
        params = dict(ctx.params)
        gain = params.pop("gain", None)  # the He-drawing schemes: a number, or "activation"
        if gain is None or gain == "activation":
            if gain == "activation" and ctx.activation is None:
                raise UserError(f"init {name!r} draws He weights with the activation's gain, and this model "
                                f"has no activation setting; give one: [init_params.{name}] gain = <number> "
                                "(e.g. 1.414 for relu)")
            scheme.apply(model, activation=ctx.activation or "relu", **params)
        else:
            scheme.apply(model, activation=float(gain), **params)

    return apply


def _small_init(model: nn.Module, ctx: InitContext) -> None:
    """Small init (Nguyen & Salazar 2019): ``residual_inits.small_init_`` with d = ``[init_params.small_init]
    d``, or the model's width setting when d is ``"width"`` (the default)."""
    d = ctx.params["d"]
    if d == "width":
        if ctx.width is None:
            raise UserError("init 'small_init' draws N(0, 2 / (5 d)) with d = the model width, and this "
                            "model has no width setting; give one: [init_params.small_init] d = <width>")
        d = ctx.width
    residual_inits.small_init_(model, width=int(d), activation=ctx.activation or "relu",
                               wang_outputs=bool(ctx.params["wang_outputs"]))


def _mup(model: nn.Module, ctx: InitContext) -> None:
    """muP (Yang et al. 2021; microsoft/mup): base shapes from the model rebuilt at ``base_width`` and
    twice that, then ``residual_inits.mup_``. The base shapes stay on the model (``mup_base_shapes``):
    the engines read each parameter's learning-rate multiplier from them (``mup_lr_multipliers``)."""
    if ctx.rebuild is None:
        raise UserError("init 'mup' needs an architecture that can be rebuilt at another width (a "
                        "built-in such as resmlp or transformer, or a factory taking a 'width' setting)")
    params = dict(ctx.params)
    base_width = int(params.pop("base_width"))
    shapes = residual_inits.width_shapes(lambda in_shape, out_dim, width, **kw: ctx.rebuild(width=width),
                                         None, None, base_width=base_width)
    residual_inits.mup_(model, base_shapes=shapes, activation=ctx.activation or "relu", **params)
    model.mup_base_shapes = shapes


# The implementations, keyed by the names bench.train.schemes.SCHEMES declares (with their parameters):
# a scheme declared per_tensor is its (tensor, ctx) function, applied to every weight; any other one
# initializes the whole model. tests/test_layers.py asserts these hold exactly the declared names.
PER_TENSOR: dict[str, Callable[[torch.Tensor, InitContext], None]] = {
    "kaiming_uniform": kaiming_uniform_,
    "kaiming_normal": kaiming_normal_,
    "xavier_uniform": xavier_uniform_,
    "xavier_normal": xavier_normal_,
    "orthogonal": orthogonal_,
    "zeros": zeros_,
    "scaled_normal": scaled_normal_,
    "trunc_normal": trunc_normal_,
    "mean_field": mean_field_,
}
WHOLE_MODEL: dict[str, Callable[[nn.Module, InitContext], None]] = {
    "default": _default,
    "lsuv": _lsuv,
    # Schemes for residual nets and transformers: they find the residual branches through the block
    # convention (architectures.py) and set every bias and norm themselves.
    **{name: _residual(name) for name in ("zero_residual", "fixup", "skipinit", "rezero", "gpt2")},
    "small_init": _small_init,  # sets every bias (0) and norm (1/0) itself, as the residual schemes do
    "mup": _mup,
}


def _entry(name: str, declared: schemes.Declared) -> Scheme:
    if declared.per_tensor:
        fn = PER_TENSOR[name]
        return Scheme(**vars(declared), apply=_per_tensor(fn), tensor=fn)
    return Scheme(**vars(declared), apply=WHOLE_MODEL[name])


INITS: dict[str, Scheme] = {name: _entry(name, d) for name, d in schemes.SCHEMES.items()}


def scheme(name: str) -> Scheme:
    """Look up a scheme by name; unknown names fail loudly with the choices."""
    try:
        return INITS[name]
    except KeyError:
        raise UserError(f"unknown init {name!r}; choose from {sorted(INITS)}") from None


def check_rules(model: nn.Module, rules: Sequence[Rule], where: str = "init rules") -> None:
    """Raise a UserError naming the first rule that matches no parameter of ``model`` (a typo is
    never ignored), or that names a scheme needing fans for a parameter of fewer than 2 dims.

    Works on a model built on the meta device, so a spec can be checked without drawing anything.
    """
    params = parameters(model)
    names = [p.name for p in params]
    for i, rule in enumerate(rules, 1):
        matched = [p for p in params if fnmatch.fnmatchcase(p.name, rule.match)]
        if not matched:
            shown = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
            raise UserError(f"{where} rule {i} {rule.describe()} matches no parameter; the model's "
                            f"parameters are named {shown} ({len(names)} in all)")
        flat = [p.name for p in matched if p.tensor.dim() < 2]
        if rule.init is not None and INITS[rule.init].fans and flat:
            raise UserError(f"{where} rule {i} {rule.describe()}: init {rule.init!r} needs fans, and "
                            f"{flat[0]!r} has fewer than 2 dims; narrow the match, or use a scale, a value, "
                            "zeros, scaled_normal or trunc_normal")


def apply_rules(model: nn.Module, rules: Sequence[Rule], ctx: InitContext, where: str = "init rules") -> None:
    """Apply ``rules`` to ``model`` in order (after its scheme); every rule is checked first."""
    check_rules(model, rules, where)
    params = parameters(model)
    with torch.no_grad():
        for rule in rules:
            for p in (p for p in params if fnmatch.fnmatchcase(p.name, rule.match)):
                if rule.init is not None:
                    rule_ctx = replace(ctx, scheme=rule.init, params=dict(rule.params))
                    _init_tensor(p, INITS[rule.init].tensor, rule_ctx)
                elif rule.scale is not None:
                    p.tensor.mul_(rule.scale)
                else:
                    p.tensor.fill_(rule.value)


def apply(model: nn.Module, name: str, ctx: InitContext, init_bias: str | float = "auto",
          rules: Sequence[Rule] = (), rules_where: str = "init rules") -> None:
    """Initialize ``model`` in place with scheme ``name``, then its ``rules``.

    Args:
        model: any nn.Module; its constructors have already drawn PyTorch's defaults (whose
            biases ``init_bias = "default"`` keeps).
        name: a key of :data:`INITS`.
        ctx: activation (None if the model has none), scheme parameters and (for
            data-dependent schemes) a batch.
        init_bias: ``"auto"`` (zeros for named schemes, the layer's own draw for
            ``default``; ``sigma_b2`` for ``mean_field``), ``"zeros"``, ``"default"``
            or a constant. It sets every bias role (:func:`parameters`), not norms.
        rules: applied last, in order (:func:`apply_rules`).
    """
    entry = scheme(name)
    # Fill in the scheme's defaults, so a caller that passes no params gets the documented
    # scheme (xavier/orthogonal gain 1, not _gain's fallback to the activation's gain).
    ctx = replace(ctx, params=resolve_params(name, ctx.params), scheme=name)
    params = parameters(model)
    biases = [p.tensor for p in params if p.role == "bias"]
    norms = [p for p in params if p.role == "norm"]
    drawn = [b.detach().clone() for b in biases]

    @torch.no_grad()
    def set_biases() -> None:
        for bias, original in zip(biases, drawn, strict=True):
            if init_bias == "default":
                # The layer's own draw: the constructor's for named schemes; `default` has just
                # redrawn it together with the weight, and keeps that draw (as under "auto").
                if entry.named:
                    bias.copy_(original)
            elif init_bias == "zeros" or (init_bias == "auto" and entry.named):
                bias.zero_()
                if name == "mean_field" and init_bias == "auto":
                    bias.normal_(0.0, math.sqrt(float(ctx.params["sigma_b2"])))
            elif not isinstance(init_bias, str):
                bias.fill_(float(init_bias))
        if entry.named:  # a norm layer starts as the identity map: weight 1, bias 0
            for p in norms:
                p.tensor.fill_(1.0 if p.leaf == "weight" else 0.0)

    if entry.data_dependent:
        # LSUV scales each layer to unit output variance: it must see the final biases, or
        # zeroing them afterwards shifts every variance it has just normalized.
        set_biases()
        entry.apply(model, ctx)
    else:
        entry.apply(model, ctx)
        set_biases()
    if rules:
        apply_rules(model, rules, ctx, rules_where)
