"""Init schemes for residual networks and transformers, by parameter, on any module.

Every scheme is an in-place function ``name_(model, *, activation, **params)`` that runs
under ``torch.no_grad()`` and reads the residual convention of
:mod:`bench.train.architectures` (``blocks``, ``branch_ends``, ``branch_layers``,
``branch_norms``, ``branch_gates``, ``scalar_biases``, ``head``). A scheme that needs
structure the model lacks raises a :class:`UserError` naming the scheme and what it
needs. :data:`RESIDUAL_INITS` maps names to schemes and their parameters' defaults.

The schemes redraw every parameter they own, so the result never depends on what the
constructors drew, except where a docstring says a layer keeps its default draw.
"He normal" below is N(0, gain^2 / fan_in) with the activation's gain (the project's
``kaiming_normal``); convolution fans are PyTorch's (C_in k^2 in, C_out k^2 out).
q, k and v: the built-in transformer packs them in one (3 width, width) Linear
``attn.qkv``; a scheme drawing each entry independently with one std (gpt2, small_init,
He) draws the three matrices exactly as if they were separate, so the packing does not
matter for them. Only muP's query zero-init reads the packing (the first third of rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.errors import UserError
from bench.train import activations

NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- the convention, read


def blocks(model: nn.Module, scheme: str) -> list[tuple[str, nn.Module]]:
    """``(dotted name, block)`` of every residual block, or a UserError naming ``scheme``."""
    found = getattr(model, "blocks", None)
    if not isinstance(found, nn.ModuleList) or len(found) == 0:
        raise UserError(f"init {scheme!r} needs residual blocks: an nn.ModuleList called 'blocks' on the "
                        "model (the residual convention, bench.train.architectures)")
    return [(f"blocks.{i}", block) for i, block in enumerate(found)]


def block_attr(block: nn.Module, name: str, attr: str, scheme: str, hint: str = "") -> tuple:
    """The tuple ``block.<attr>`` of the convention; missing or empty: a UserError."""
    value = tuple(getattr(block, attr, ()) or ())
    if not value:
        raise UserError(f"init {scheme!r} needs {attr!r} on every residual block; {name} "
                        f"({type(block).__name__}) has none{hint}")
    return value


def param(block: nn.Module, name: str, relative: str, scheme: str) -> torch.Tensor:
    """The parameter ``relative`` of a block; a name that does not resolve is a UserError."""
    try:
        return block.get_parameter(relative)
    except AttributeError:
        raise UserError(f"init {scheme!r}: {name} names parameter {relative!r}, which it does not "
                        "have") from None


def branches(model: nn.Module, scheme: str) -> list[tuple[str, nn.Module, int]]:
    """``(block name, block, branch index)`` of every residual branch."""
    out = []
    for name, block in blocks(model, scheme):
        ends = block_attr(block, name, "branch_ends", scheme)
        out += [(name, block, i) for i in range(len(ends))]
    return out


def head(model: nn.Module, scheme: str) -> nn.Module:
    layer = getattr(model, "head", None)
    if not isinstance(layer, nn.Module) or not isinstance(getattr(layer, "weight", None), torch.Tensor):
        raise UserError(f"init {scheme!r} needs the output layer to be a module called 'head' with a weight")
    return layer


def _scalars(model: nn.Module, attr: str) -> list[torch.Tensor]:
    """Every scalar of the convention called ``attr`` (branch_gates or scalar_biases), model and blocks."""
    out = [model.get_parameter(n) for n in getattr(model, attr, ()) or ()]
    for block in getattr(model, "blocks", None) or ():
        out += [block.get_parameter(n) for n in getattr(block, attr, ()) or ()]
    return out


# --------------------------------------------------------------------------- shared pieces


def he_normal_(w: torch.Tensor, activation: str | float, scale: float = 1.0) -> None:
    """N(0, (scale * gain / sqrt(fan_in))^2) with the activation's gain (``activation``: its name, or
    the gain itself, as ``[init_params.<scheme>] gain`` gives it)."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(w)
    gain = float(activation) if isinstance(activation, (int, float)) else activations.get(activation).gain
    w.normal_(0.0, scale * gain / math.sqrt(fan_in))


def tied(model: nn.Module, layer: nn.Module) -> bool:
    """Whether ``layer``'s weight is an embedding's (a tied head): never reset it as a Linear."""
    return any(layer.weight is m.weight for m in model.modules() if isinstance(m, nn.Embedding))


def _normal_layers_(model: nn.Module, std: float) -> None:
    """Every Linear, Conv and Embedding weight and every nn.MultiheadAttention projection (q, k, v
    packed or apart; its out_proj is a Linear) ~ N(0, std^2), their biases 0."""
    for module in model.modules():
        if isinstance(module, (*LAYERS, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, name, None) is not None:
                    getattr(module, name).normal_(0.0, std)
            if module.in_proj_bias is not None:
                module.in_proj_bias.zero_()


def _neutral_(model: nn.Module) -> None:
    # Norms 1/0, gates 1, scalar biases 0: the identity, so only what a scheme sets matters.
    for module in model.modules():
        if isinstance(module, NORMS) and module.weight is not None:
            module.weight.fill_(1.0)
            if module.bias is not None:  # LayerNorm(bias=False)
                module.bias.zero_()
    for gate in _scalars(model, "branch_gates"):
        gate.fill_(1.0)
    for bias in _scalars(model, "scalar_biases"):
        bias.zero_()


def _he_base_(model: nn.Module, activation: str | float) -> None:
    """He normal on every Linear/Conv weight and nn.MultiheadAttention q, k, v projection (packed:
    fan_in = the embedding width; apart: each its own input width, ``kdim``, ``vdim``) but
    ``head`` (PyTorch's default draw, as torchvision's fc), biases 0, embeddings keep their
    default N(0, 1), norms and scalars neutral."""
    out = getattr(model, "head", None)
    for module in model.modules():
        if isinstance(module, LAYERS):
            if module is out:
                if not tied(model, out):
                    module.reset_parameters()
                continue
            he_normal_(module.weight, activation)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, name, None) is not None:
                    he_normal_(getattr(module, name), activation)
            if module.in_proj_bias is not None:
                module.in_proj_bias.zero_()
    _neutral_(model)


# --------------------------------------------------------------------------- the schemes


@torch.no_grad()
def zero_residual_(model: nn.Module, *, activation: str | float = "relu") -> None:
    """Zero-init of each residual branch's end (Goyal et al. 2017, "Accurate, large minibatch SGD").

    torchvision ``models/resnet.py`` (``zero_init_residual=True``): convs
    ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, norms 1/0, then ``bn3``/``bn2``
    weight = 0 in every block. Here: :func:`_he_base_` (He normal with fan_in; fan_in =
    fan_out for the width-to-width branch layers), then per branch the gain of its
    branch-final norm (``branch_norms``) = 0 where one exists, else its last layer's weight
    (``branch_ends``) = 0. Every block starts as the identity.
    """
    targets = []  # resolved before anything is drawn: a bad name leaves the model untouched
    for name, block, i in branches(model, "zero_residual"):
        norms = tuple(getattr(block, "branch_norms", ()) or ())
        target = norms[i] if i < len(norms) and norms[i] is not None else block.branch_ends[i]
        targets.append(param(block, name, target, "zero_residual"))
    _he_base_(model, activation)
    for target in targets:
        target.zero_()


@torch.no_grad()
def fixup_(model: nn.Module, *, activation: str | float = "relu") -> None:
    """Fixup (Zhang, Dauphin & Ma 2019, "Fixup initialization: residual learning without normalization").

    Rule: the classifier (``head``) and the last layer of each branch = 0; the other branch
    layers He normal times L^(-1/(2m-2)) (L branches in the net, m layers in a branch);
    layers outside the branches (the stem) He normal; scalar biases 0 and the branch
    multiplier 1. Official code, hongyi-zhang/Fixup ``cifar/models/fixup_resnet_cifar.py``:
    conv1 ~ N(0, 2 / (C_out k^2)) * L^(-1/2) (m = 2; fan_out = fan_in for its square convs),
    conv2 = 0, fc weight and bias = 0. Needs ``branch_layers``, ``branch_gates`` (the
    multiplier) and ``scalar_biases``: build resmlp/resnet with ``gates=True,
    scalar_biases=True``. The transformer has no ``branch_layers`` (attention is not a chain
    of layers): Fixup does not apply to it (T-Fixup is a different rule).
    """
    hint = " (build it with gates=True, scalar_biases=True)"
    found = blocks(model, "fixup")
    for name, block in found:
        block_attr(block, name, "branch_layers", "fixup", " (Fixup needs each branch's layers)")
        block_attr(block, name, "branch_gates", "fixup", hint)
        block_attr(block, name, "scalar_biases", "fixup", hint)
        for chain in block.branch_layers:
            if len(chain) < 2:
                raise UserError(f"init 'fixup': {name} has a branch of {len(chain)} layer; the rule "
                                "L^(-1/(2m-2)) needs m >= 2 layers per branch")
    chains = [[param(block, name, rel, "fixup") for rel in chain]
              for name, block in found for chain in block.branch_layers]
    out = head(model, "fixup")
    _he_base_(model, activation)
    for chain in chains:
        scale = len(chains) ** (-1.0 / (2 * len(chain) - 2))  # L^(-1/(2m-2))
        for w in chain[:-1]:
            he_normal_(w, activation, scale)
        chain[-1].zero_()
    out.weight.zero_()
    if getattr(out, "bias", None) is not None:
        out.bias.zero_()


@torch.no_grad()
def skipinit_(model: nn.Module, *, activation: str | float = "relu", alpha: float = 0.0) -> None:
    """SkipInit (De & Smith 2020, "Batch normalization biases residual blocks towards the identity").

    x + alpha * f(x) with the scalar alpha = 0 at init (timm ``models/nfnet.py``:
    ``skipinit_gain = nn.Parameter(torch.tensor(0.))``); everything else :func:`_he_base_`.
    Needs ``branch_gates`` (build with ``gates=True``).
    """
    hint = " (build the architecture with gates=True)"
    for name, block in blocks(model, "skipinit"):
        block_attr(block, name, "branch_gates", "skipinit", hint)
    _he_base_(model, activation)
    for gate in _scalars(model, "branch_gates"):
        gate.fill_(alpha)


@torch.no_grad()
def rezero_(model: nn.Module, *, activation: str | float = "relu") -> None:
    """ReZero (Bachlechner et al. 2020; majumderb/rezero): SkipInit's alpha = 0 with no normalization.

    Raises where a block holds a norm layer (build with ``norm="none"``; the built-in
    transformer always has LayerNorms, so ReZero does not apply to it).
    """
    for name, block in blocks(model, "rezero"):
        if any(isinstance(m, NORMS) for m in block.modules()):
            raise UserError(f"init 'rezero' is SkipInit without normalization, but {name} holds a norm "
                            "layer; build the architecture with norm='none', or use skipinit")
    skipinit_(model, activation=activation, alpha=0.0)


@torch.no_grad()
def gpt2_(model: nn.Module, *, activation: str = "relu", std: float = 0.02) -> None:
    """GPT-2's init as nanoGPT writes it (karpathy/nanoGPT ``model.py`` ``_init_weights``).

    Every Linear (and Conv) weight and Embedding ~ N(0, std^2), biases 0, norms 1/0; then
    each residual branch's output projection (``branch_ends``: ``attn.proj``, ``mlp.proj``)
    ~ N(0, (std / sqrt(L))^2) with L the number of residual branches, which is nanoGPT's
    2 * n_layer for a GPT (HF ``modeling_gpt2.py``: initializer_range / sqrt(2 n_layer)).
    q, k, v are one (3 width, width) matrix, as nanoGPT's ``c_attn``; with i.i.d. entries
    that equals three separate draws; an ``nn.MultiheadAttention``'s q, k, v projections (packed
    ``in_proj_weight`` or apart) are drawn the same way (its ``out_proj`` is a Linear). A tied
    head is the token embedding: drawn once.
    """
    ends = [param(block, name, block.branch_ends[i], "gpt2") for name, block, i in branches(model, "gpt2")]
    _normal_layers_(model, std)
    _neutral_(model)
    for end in ends:
        end.normal_(0.0, std / math.sqrt(len(ends)))


@torch.no_grad()
def small_init_(model: nn.Module, *, width: int, activation: str = "relu",
                wang_outputs: bool = False) -> None:
    """Small init (Nguyen & Salazar 2019, "Transformers without tears"): N(0, 2 / (5d)), d = width.

    sqrt(2 / (5d)) is Xavier-normal's std for a d x 4d FFN matrix. What the paper's code
    (tnq177/transformers_without_tears ``layers.py``) draws with it: the attention's q, k, v
    and output projections, "the smaller std of feedforward module" instead of Xavier's
    sqrt(2 / 2d); its FFN matrices get Xavier normal sqrt(2 / (d + d_ff)), which is the same
    number at d_ff = 4d; its embeddings are N(0, 1 / d) (``model.py``), times sqrt(d) in the
    forward, and tied to the softmax. Here, as in GPT-NeoX (``megatron/model/init_functions.py``
    ``small_init_init_method``, used for every layer and the embedding), every Linear (and
    Conv) weight, every Embedding and an nn.MultiheadAttention's packed in-projection get
    N(0, 2 / (5d)), whatever their shape; biases 0, norms 1/0. (RWKV's "SmallInit" is another
    rule: U(+-1e-4) on the embedding alone, BlinkDL/SmallInitEmb.) With ``wang_outputs`` the
    residual branch ends get NeoX's ``wang_init_method``: std = 2 / (n_layers sqrt(d)),
    n_layers = the number of blocks (this needs the residual convention; plain small init
    applies to any model). q, k, v: one matrix (i.i.d. entries: same as three).
    """
    ends = ([param(block, name, block.branch_ends[i], "small_init")
             for name, block, i in branches(model, "small_init")] if wang_outputs else [])
    _normal_layers_(model, math.sqrt(2.0 / (5.0 * width)))
    _neutral_(model)
    if wang_outputs:
        wang = 2.0 / (len(model.blocks) * math.sqrt(width))
        for end in ends:
            end.normal_(0.0, wang)


# --------------------------------------------------------------------------- muP


Shapes = dict[str, tuple[int | None, ...]]


def width_shapes(factory: Callable[..., nn.Module], in_shape: tuple, out_dim: int, *, base_width: int,
                 **settings: Any) -> Shapes:
    """muP base shapes: per parameter, each dim's size at ``base_width``, or None where the dim
    does not grow with width (mup ``make_base_shapes(base, delta)``: a dim is a width dim
    when it differs between the base model and a delta model at 2 x base_width).

    Both models are built on the meta device, so this costs no memory.
    """
    with torch.device("meta"):
        base = dict(factory(in_shape, out_dim, width=base_width, **settings).named_parameters())
        delta = dict(factory(in_shape, out_dim, width=2 * base_width, **settings).named_parameters())
    return {name: tuple(b if b != d else None for b, d in zip(p.shape, delta[name].shape))
            for name, p in base.items()}


@dataclass(frozen=True)
class InfShape:
    """mup's ``InfShape`` for one parameter: its width multipliers, per dim (1 for finite dims)."""

    mults: tuple[float, ...]
    inf: tuple[bool, ...]

    @property
    def ninf(self) -> int:
        return sum(self.inf)

    @property
    def width_mult(self) -> float:
        """The last infinite dim's multiplier (the fan-in's for a hidden matrix), 1 if none."""
        return next((m for m, i in zip(reversed(self.mults), reversed(self.inf)) if i), 1.0)

    @property
    def fanin_fanout_mult_ratio(self) -> float:
        return self.mults[1] / self.mults[0]


def infshapes(model: nn.Module, base_shapes: Shapes) -> dict[str, InfShape]:
    """Every parameter's InfShape against ``base_shapes`` (from :func:`width_shapes`)."""
    names = dict(model.named_parameters())
    if set(names) != set(base_shapes):
        raise UserError(f"init 'mup': the base shapes do not match the model's parameters "
                        f"(extra: {sorted(set(base_shapes) - set(names))}, missing: "
                        f"{sorted(set(names) - set(base_shapes))})")
    out = {}
    for name, p in names.items():
        base = base_shapes[name]
        out[name] = InfShape(tuple(1.0 if b is None else s / b for s, b in zip(p.shape, base)),
                             tuple(b is not None for b in base))
    return out


@torch.no_grad()
def mup_(model: nn.Module, *, base_shapes: Shapes, activation: str = "relu", output_mult: float = 1.0,
         readout_zero_init: bool = True, query_zero_init: bool = True) -> None:
    """Maximal-update parametrization's init (Yang et al. 2021, Tensor Programs V; microsoft/mup).

    As ``mup.set_base_shapes(model, base, rescale_params=True)`` on a model with PyTorch's
    default init (``mup/shape.py``, ``mup/layer.py``): every layer is first reset to its
    default draw (hidden and input weights keep Var 1/(3 fan_in): 1/fan_in scaling); the
    biases of Linear/Conv layers are multiplied by sqrt(fan_in width multiplier) (constant
    in width); the readout ``head`` (a width-to-finite matrix: mup's ``MuReadout``) gets
    weight and bias times sqrt(width_mult), or 0 with ``readout_zero_init`` (the mup
    examples' choice), and the model's ``head_mult`` buffer = output_mult / width_mult (the
    readout's forward multiplier). Attention: where the model has ``attn.logit_mult`` buffers
    (the built-in transformer), they become 1/sqrt(width_mult), which turns 1/sqrt(head_dim)
    logits into muP's sqrt(base_head_dim)/head_dim (= 1/head_dim up to the base's constant,
    mup's "8/d" for d = 64; assumes the number of heads is fixed across widths); with
    ``query_zero_init`` the q rows (first third) of each packed ``attn.qkv`` are 0.
    A tied head is mup's ``MuSharedReadout``: the shared weight is rescaled, never zeroed.
    Learning rates: :func:`mup_lr_multipliers`.
    """
    shapes = infshapes(model, base_shapes)
    if "head_mult" not in dict(model.named_buffers()):
        raise UserError("init 'mup' needs a scalar buffer 'head_mult' on the model that multiplies the "
                        "input of 'head' (the residual convention, bench.train.architectures)")
    out = head(model, "mup")
    is_tied = tied(model, out)
    names = {id(p): n for n, p in model.named_parameters()}
    layers = [(m, shapes[names[id(m.weight)]]) for m in model.modules()
              if isinstance(m, LAYERS) and m is not out]
    for module, shape in layers:
        if not shape.inf[0] and shape.inf[1]:
            raise UserError(f"init 'mup': {names[id(module.weight)]} maps width to a fixed size but is not "
                            "'head' (mup allows one readout: name it 'head')")
    for module in model.modules():
        # A tied head keeps the embedding's draw (mup's MuSharedReadout does not redraw it).
        if hasattr(module, "reset_parameters") and module is not model and not (module is out and is_tied):
            module.reset_parameters()
    _neutral_(model)
    for module, shape in layers:
        if module.bias is not None:
            module.bias.mul_(math.sqrt(shape.mults[1]))
    readout = shapes[names[id(out.weight)]]
    if readout_zero_init and not is_tied:
        out.weight.zero_()
        if out.bias is not None:
            out.bias.zero_()
    else:
        out.weight.mul_(math.sqrt(readout.width_mult))
        if out.bias is not None:
            out.bias.mul_(math.sqrt(readout.width_mult))
    model.get_buffer("head_mult").fill_(output_mult / readout.width_mult)
    for name, buffer in model.named_buffers():
        if name.endswith("attn.logit_mult"):
            buffer.fill_(1.0 / math.sqrt(readout.width_mult))
    if query_zero_init:
        for name, module in model.named_modules():
            if name.endswith("attn.qkv") and isinstance(module, nn.Linear):
                third = module.out_features // 3
                module.weight[:third].zero_()
                if module.bias is not None:
                    module.bias[:third].zero_()


def mup_lr_multipliers(model: nn.Module, *, base_shapes: Shapes, optimizer: str) -> dict[str, float]:
    """Each parameter's muP learning-rate multiplier, by name (``mup/optim.py``).

    ``adam`` (MuAdam, also AdamW): matrix-like parameters (two width dims: hidden weights)
    get lr / width_mult (their fan-in's multiplier); everything else (input weights,
    embeddings, biases, norms, the readout) keeps lr. ``sgd`` (MuSGD): vector-like
    parameters (one width dim: input weights, biases, norm gains, the readout) get
    lr * width_mult; matrix-like get lr / (fan_in mult / fan_out mult); the rest keep lr.
    Weight decay: :func:`mup_wd_multipliers`. Tied weights appear once, under the name
    ``named_parameters()`` gives them.
    """
    if optimizer not in ("adam", "sgd"):
        raise UserError(f"mup learning rates: optimizer {optimizer!r}; choose from ['adam', 'sgd']")
    out = {}
    for name, shape in infshapes(model, base_shapes).items():
        if shape.ninf > 2:
            raise UserError(f"init 'mup': {name} has {shape.ninf} width dims (mup allows at most 2)")
        if optimizer == "adam":
            out[name] = 1.0 / shape.width_mult if shape.ninf == 2 else 1.0
        elif shape.ninf == 2:
            out[name] = 1.0 / shape.fanin_fanout_mult_ratio
        else:
            out[name] = shape.width_mult if shape.ninf == 1 else 1.0
    return out


def mup_wd_multipliers(model: nn.Module, *, base_shapes: Shapes, optimizer: str) -> dict[str, float]:
    """Each parameter's muP weight-decay multiplier, by name: the inverse of its learning-rate
    multiplier (:func:`mup_lr_multipliers`).

    mup ``mup/optim.py`` (microsoft/mup at 1981497, lines 77-79 and 133-139; PyPI mup 1.0.0, lines
    67-68 and 112-116): with ``decoupled_wd=False`` (the default, and the only behaviour of 1.0.0)
    MuAdam multiplies a group's weight_decay by width_mult where it divides its lr by width_mult,
    and MuSGD divides it by width_mult where it multiplies lr, and multiplies it by the fan-in /
    fan-out ratio where it divides lr by it. torch.optim's SGD and Adam add weight_decay * p to the
    gradient (coupled L2, as :class:`bench.train.optim.FlatOptimizer` does), so for SGD the decay
    step lr * weight_decay * p stays width-independent; ``decoupled_wd=True`` (for AdamW-like
    optimizers, which multiply the decay by lr themselves) leaves weight_decay alone.
    """
    return {name: 1.0 / m for name, m in
            mup_lr_multipliers(model, base_shapes=base_shapes, optimizer=optimizer).items()}


@dataclass(frozen=True)
class ResidualScheme:
    """A registry entry: the in-place function and its parameters' defaults (beyond activation)."""

    apply: Callable[..., None]
    params: dict[str, Any]


RESIDUAL_INITS: dict[str, ResidualScheme] = {
    "zero_residual": ResidualScheme(zero_residual_, {}),
    "fixup": ResidualScheme(fixup_, {}),
    "skipinit": ResidualScheme(skipinit_, {"alpha": 0.0}),
    "rezero": ResidualScheme(rezero_, {}),
    "gpt2": ResidualScheme(gpt2_, {"std": 0.02}),
    "small_init": ResidualScheme(small_init_, {"wang_outputs": False}),  # + width (the model's)
    "mup": ResidualScheme(mup_, {"output_mult": 1.0, "readout_zero_init": True, "query_zero_init": True}),
}
