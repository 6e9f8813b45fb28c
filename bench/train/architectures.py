"""Built-in architectures as factories ``fn(in_shape, out_dim, **settings) -> nn.Module``.

``in_shape`` is one sample's shape ((1, 8, 8) images, (16,) vectors, (T,) token
sequences); ``out_dim`` is the number of classes, the vocabulary size or the regression
width. Every model is built from real PyTorch layers with their constructors' own
(default) init; init schemes are applied afterwards. Inputs may arrive flattened (the
tasks give (N, features) rows): image models reshape them to ``(N, *in_shape)``.

The residual convention (what residual init schemes read; user factories can follow it)
-------------------------------------------------------------------------------------
- The residual blocks are an ``nn.ModuleList`` called ``blocks`` on the model, so
  ``blocks.0`` ... ``blocks.<depth-1>`` are their dotted names and a forward hook on
  ``blocks.i`` sees the residual stream after block i.
- Each block declares, as attributes, parameter names *relative to the block*:

  ``branch_ends: tuple[str, ...]`` (required)
      per residual branch, the weight of the branch's last layer, e.g. ``("fc2.weight",)``
      or ``("attn.proj.weight", "mlp.proj.weight")`` (a branch is the f in x + f(x)).
  ``branch_norms: tuple[str | None, ...]`` (optional; default: no norm ends a branch)
      per branch, the gain of a norm layer that comes *after* the last layer and ends
      the branch (``"bn2.weight"`` in a ResNet basic block), or None.
  ``branch_layers: tuple[tuple[str, ...], ...]`` (optional; Fixup needs it)
      per branch, the weights of all its layers in forward order, ending with that
      branch's ``branch_ends`` entry: m = the number of layers of a branch.
  ``branch_gates: tuple[str, ...]`` (optional; SkipInit and Fixup need it)
      per branch, a scalar parameter multiplying the branch: x + gate * f(x).
      Built-in blocks have them when built with ``gates=True`` (default value 1, so
      the architecture is unchanged until a scheme sets them).
  ``scalar_biases: tuple[str, ...]`` (optional; Fixup needs it)
      scalar bias parameters added inside the branch, before each layer and activation
      (Fixup's bias1a, bias1b, bias2a, bias2b). Built in with ``scalar_biases=True``
      (value 0). A model may also list model-level ones (absolute names) in its own
      ``scalar_biases`` attribute (Fixup's bias before the classifier).
- The output layer is a module called ``head``. Built-in models multiply its input by a
  scalar buffer ``head_mult`` (1.0; muP sets it to output_mult / width_mult), and the
  built-in transformer multiplies its queries by a buffer ``attn.logit_mult`` per block
  (1.0, i.e. the usual 1/sqrt(head_dim) logits; muP makes them 1/head_dim-like). They are
  buffers, not attributes, so that a per-job init value travels with the job's state.

A scheme that needs structure a model lacks raises a UserError naming the scheme and the
missing attribute (and the setting that builds it for built-in architectures).

A user block that every residual scheme accepts::

    class Block(nn.Module):
        branch_ends = ("fc2.weight",)
        branch_layers = (("fc1.weight", "fc2.weight"),)
        branch_gates = ("gate",)
        scalar_biases = ("b1", "b2")

        def __init__(self, width):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
            self.gate = nn.Parameter(torch.ones(1))
            self.b1, self.b2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x + self.gate * self.fc2(torch.relu(self.fc1(x + self.b1)) + self.b2)

and the model holds ``self.blocks = nn.ModuleList(...)`` and ``self.head``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from bench import theory
from bench.errors import UserError
from bench.train import activations

CNN_NORMS = ("none", "batch", "group")
RESMLP_NORMS = ("none", "layer", "batch")
RESNET_NORMS = ("none", "batch")


def _check(arch: str, key: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"[model] {key} = {value!r} for arch {arch!r}: choose from {list(choices)}")


def _positive(arch: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"[model] {key} = {value!r} for arch {arch!r}: expected an integer >= 1")


def _image_shape(arch: str, in_shape: tuple) -> tuple[int, int, int]:
    if len(in_shape) == 2:
        return (1, *in_shape)
    if len(in_shape) == 3:
        return tuple(in_shape)
    raise UserError(f"arch {arch!r} needs image samples (C, H, W) or (H, W); "
                    f"the task gives {tuple(in_shape)}")


def _scalar(value: float) -> nn.Parameter:
    # Shape (1,) as in Fixup's official code: code that reads p.shape[0] keeps working.
    return nn.Parameter(torch.full((1,), float(value)))


def _add_scalars(block: nn.Module, gates: bool, scalar_biases: bool) -> None:
    """A block's optional scalar gate (``gate``, 1) and Fixup's four scalar biases (0), declared
    through the residual convention's ``branch_gates`` and ``scalar_biases``; None when absent."""
    block.gate = _scalar(1.0) if gates else None
    block.branch_gates = ("gate",) if gates else ()
    names = ("bias1a", "bias1b", "bias2a", "bias2b")
    for name in names:
        setattr(block, name, _scalar(0.0) if scalar_biases else None)
    block.scalar_biases = names if scalar_biases else ()


def _plus(h: torch.Tensor, bias: nn.Parameter | None) -> torch.Tensor:
    return h if bias is None else h + bias


class _Model(nn.Module):
    """Common parts: the ``head_mult`` buffer and the model-level ``scalar_biases`` list."""

    scalar_biases: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("head_mult", torch.ones(()))


# --------------------------------------------------------------------------- plain CNN


class CNN(_Model):
    """``depth`` 3x3 convs (padding 1) at ``width`` channels, norm, activation; mean pool; head."""

    def __init__(self, in_shape: tuple, out_dim: int, depth: int, width: int, activation: str, norm: str):
        super().__init__()
        self.in_shape = _image_shape("cnn", in_shape)
        channels = [self.in_shape[0], *([width] * depth)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels, channels[1:]))
        if norm == "batch":
            self.norms = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(depth))
        elif norm == "group":
            self.norms = nn.ModuleList(nn.GroupNorm(math.gcd(8, width), width) for _ in range(depth))
        else:
            self.norms = None
        self.act = activations.get(activation).module()
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), *self.in_shape)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = self.act(x)
        return self.head(x.mean(dim=(2, 3)) * self.head_mult)


def cnn(in_shape: tuple, out_dim: int, *, depth: int, width: int, activation: str = "relu",
        norm: str = "none") -> nn.Module:
    """A plain CNN; ``norm`` is none, batch (BatchNorm2d) or group (GroupNorm, gcd(8, width) groups)."""
    _check("cnn", "norm", norm, CNN_NORMS)
    _positive("cnn", depth=depth, width=width)
    return CNN(in_shape, out_dim, depth, width, activation, norm)


# --------------------------------------------------------------------------- residual MLP


class ResMLPBlock(nn.Module):
    """x + gate * fc2(act(fc1(norm(x)))), with Fixup's scalar biases when built with them."""

    branch_ends = ("fc2.weight",)
    branch_layers = (("fc1.weight", "fc2.weight"),)
    branch_norms = (None,)

    def __init__(self, width: int, activation: str, norm: str, gates: bool, scalar_biases: bool):
        super().__init__()
        self.norm = {"layer": lambda: nn.LayerNorm(width), "batch": lambda: nn.BatchNorm1d(width),
                     "none": nn.Identity}[norm]()
        self.fc1 = nn.Linear(width, width)
        self.act = activations.get(activation).module()
        self.fc2 = nn.Linear(width, width)
        _add_scalars(self, gates, scalar_biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(_plus(self.norm(x), self.bias1a))
        h = self.fc2(_plus(self.act(_plus(h, self.bias1b)), self.bias2a))
        if self.gate is not None:
            h = h * self.gate
        return x + _plus(h, self.bias2b)


class ResMLP(_Model):
    def __init__(self, in_shape: tuple, out_dim: int, depth: int, width: int, activation: str, norm: str,
                 gates: bool, scalar_biases: bool):
        super().__init__()
        self.activation = activation  # for theory (stream_theory): the module alone does not name it
        self.stem = nn.Linear(math.prod(in_shape), width)
        self.blocks = nn.ModuleList(ResMLPBlock(width, activation, norm, gates, scalar_biases)
                                    for _ in range(depth))
        self.head_bias = _scalar(0.0) if scalar_biases else None
        self.scalar_biases = ("head_bias",) if scalar_biases else ()
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.reshape(len(x), -1))
        for block in self.blocks:
            x = block(x)
        return self.head(_plus(x, self.head_bias) * self.head_mult)


def resmlp(in_shape: tuple, out_dim: int, *, depth: int, width: int, activation: str = "relu",
           norm: str = "none", gates: bool = False, scalar_biases: bool = False) -> nn.Module:
    """Linear ``stem``, ``depth`` blocks x + fc2(act(fc1(norm(x)))), linear ``head``.

    ``norm`` (none, layer, batch) sits inside the branch, before fc1. There is no activation
    on the stream itself (a pre-activation residual MLP). ``gates`` / ``scalar_biases`` add
    the scalars of the residual convention (for skipinit and fixup).
    """
    _check("resmlp", "norm", norm, RESMLP_NORMS)
    _positive("resmlp", depth=depth, width=width)
    return ResMLP(in_shape, out_dim, depth, width, activation, norm, gates, scalar_biases)


def _mean_square(t: torch.Tensor | None, shift: torch.Tensor | None = None) -> float:
    t = torch.zeros(()) if t is None else t.detach().double()
    return float(((t + (0.0 if shift is None else shift.detach().double())) ** 2).mean())


def _affine(layer: nn.Linear, scale: float = 1.0, bias_scale: float = 1.0,
            shift: torch.Tensor | None = None) -> theory.Affine:
    """x -> scale * layer(x) (bias times ``bias_scale``) + shift, as a second-moment map."""
    w, b = layer.weight.detach().double(), layer.bias
    bias = None if b is None else b.detach().double() * bias_scale
    return theory.Affine(scale**2 * w.shape[1] * float((w**2).mean()), _mean_square(bias, shift))


@torch.no_grad()
def stream_theory(model: nn.Module) -> theory.ResidualStream | None:
    """The built-in residual MLP's second-moment maps, read off its initialized parameters; None for
    any other model (theory has no prediction for it).

    Read from the weights, not from the scheme's formula, so every scheme (residual ones, data-driven
    ones, init rules) is covered: a layer's sigma_w2 is fan_in x its mean squared weight, and gates,
    scalar biases, norm gains and ``head_mult`` enter with their values.
    """
    if not isinstance(model, ResMLP):
        return None
    blocks = []
    for block in model.blocks:
        gate = 1.0 if block.gate is None else float(block.gate)
        if isinstance(block.norm, (nn.LayerNorm, nn.BatchNorm1d)):
            gamma = block.norm.weight if block.norm.weight is not None else torch.ones(())
            beta = block.norm.bias if block.norm.bias is not None else torch.zeros(())
            entry = theory.Affine(0.0, _mean_square(gamma) + _mean_square(beta, block.bias1a))
        else:
            entry = theory.Affine(1.0, _mean_square(block.bias1a))
        blocks.append(theory.Branch(input=entry, fc1=_affine(block.fc1, shift=block.bias1b),
                                    fc2=_affine(block.fc2, gate, gate, shift=block.bias2b),
                                    act_shift=0.0 if block.bias2a is None else float(block.bias2a)))
    return theory.ResidualStream(
        modules=("stem", *(f"blocks.{i}" for i in range(len(blocks))), "head"), activation=model.activation,
        stem=_affine(model.stem), blocks=tuple(blocks), head=_affine(model.head, float(model.head_mult)),
        head_shift=0.0 if model.head_bias is None else float(model.head_bias))


# --------------------------------------------------------------------------- residual CNN


class BasicBlock(nn.Module):
    """torchvision's BasicBlock at stride 1: act(x + gate * bn2(conv2(act(bn1(conv1(x)))))).

    Convs have no bias (as torchvision's and Fixup's); with ``norm="none"`` bn1/bn2 are
    identities and the branch ends with conv2.
    """

    branch_ends = ("conv2.weight",)
    branch_layers = (("conv1.weight", "conv2.weight"),)

    def __init__(self, width: int, activation: str, norm: str, gates: bool, scalar_biases: bool):
        super().__init__()
        batch = norm == "batch"
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width) if batch else nn.Identity()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width) if batch else nn.Identity()
        self.act = activations.get(activation).module()
        self.branch_norms = ("bn2.weight",) if batch else (None,)
        _add_scalars(self, gates, scalar_biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(_plus(x, self.bias1a)))
        h = self.bn2(self.conv2(_plus(self.act(_plus(h, self.bias1b)), self.bias2a)))
        if self.gate is not None:
            h = h * self.gate
        return self.act(x + _plus(h, self.bias2b))


class ResNet(_Model):
    def __init__(self, in_shape: tuple, out_dim: int, depth: int, width: int, activation: str, norm: str,
                 gates: bool, scalar_biases: bool):
        super().__init__()
        self.in_shape = _image_shape("resnet", in_shape)
        self.stem = nn.Conv2d(self.in_shape[0], width, 3, padding=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(width) if norm == "batch" else nn.Identity()
        self.act = activations.get(activation).module()
        self.blocks = nn.ModuleList(BasicBlock(width, activation, norm, gates, scalar_biases)
                                    for _ in range(depth))
        self.head_bias = _scalar(0.0) if scalar_biases else None
        self.scalar_biases = ("head_bias",) if scalar_biases else ()
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem_norm(self.stem(x.reshape(len(x), *self.in_shape))))
        for block in self.blocks:
            x = block(x)
        return self.head(_plus(x.mean(dim=(2, 3)), self.head_bias) * self.head_mult)


def resnet(in_shape: tuple, out_dim: int, *, depth: int, width: int, activation: str = "relu",
           norm: str = "batch", gates: bool = False, scalar_biases: bool = False) -> nn.Module:
    """A small residual CNN for 8x8 images: stem conv, ``depth`` basic blocks (stride 1), pool, head."""
    _check("resnet", "norm", norm, RESNET_NORMS)
    _positive("resnet", depth=depth, width=width)
    return ResNet(in_shape, out_dim, depth, width, activation, norm, gates, scalar_biases)


# --------------------------------------------------------------------------- GPT


class CausalSelfAttention(nn.Module):
    """Packed q, k, v (``qkv``, one Linear of shape (3 width, width)) and output ``proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # Multiplies the queries: logits = logit_mult * q.k / sqrt(head_dim).
        self.register_buffer("logit_mult", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q * self.logit_mult, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class MLP(nn.Module):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.act = activations.get(activation).module()
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class GPTBlock(nn.Module):
    """Pre-LN: x + attn(ln1(x)), then + mlp(ln2(x)). Post-LN: ln1(x + attn(x)), ln2(x + mlp(x))."""

    branch_ends = ("attn.proj.weight", "mlp.proj.weight")
    branch_norms = (None, None)  # post-LN norms follow the sum, not the branch

    def __init__(self, width: int, heads: int, activation: str, pre_norm: bool, gates: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, activation)
        self.attn_gate = _scalar(1.0) if gates else None
        self.mlp_gate = _scalar(1.0) if gates else None
        self.branch_gates = ("attn_gate", "mlp_gate") if gates else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = ((self.ln1, self.attn, self.attn_gate), (self.ln2, self.mlp, self.mlp_gate))
        for norm, branch, gate in branches:
            h = branch(norm(x) if self.pre_norm else x)
            x = x + (h if gate is None else gate * h)
            if not self.pre_norm:
                x = norm(x)
        return x


class GPT(_Model):
    def __init__(self, seq_len: int, vocab: int, depth: int, width: int, heads: int, pre_norm: bool,
                 tied: bool, activation: str, gates: bool):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(GPTBlock(width, heads, activation, pre_norm, gates) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight  # one tensor; named_parameters() calls it tok.weight
        self.tied = tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.long()
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x) * self.head_mult)


def transformer(in_shape: tuple, out_dim: int, *, depth: int, width: int, heads: int = 4,
                pre_norm: bool = True, tied: bool = False, activation: str = "gelu",
                gates: bool = False) -> nn.Module:
    """A decoder-only GPT on (N, T) int tokens -> (N, T, out_dim) logits (out_dim = vocabulary).

    Token embedding ``tok``, learned positions ``pos`` (T = in_shape[0]), ``depth`` blocks of
    causal self-attention (``attn.qkv`` packed, ``attn.proj``) and a 4x MLP (``mlp.fc``,
    ``mlp.proj``) with LayerNorms ``ln1``, ``ln2``; final ``ln_f``; ``head`` without bias,
    its weight tied to ``tok.weight`` when ``tied``.
    """
    _positive("transformer", depth=depth, width=width, heads=heads)
    if len(in_shape) != 1:
        raise UserError(f"arch 'transformer' needs token sequences (T,); the task gives {tuple(in_shape)}")
    if width % heads:
        raise UserError(f"[model] width = {width} for arch 'transformer' must be divisible by "
                        f"heads = {heads}")
    return GPT(in_shape[0], out_dim, depth, width, heads, pre_norm, tied, activation, gates)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cnn": cnn,
    "resmlp": resmlp,
    "resnet": resnet,
    "transformer": transformer,
}


def get(name: str) -> Callable[..., nn.Module]:
    """The architecture factory called ``name``; an unknown name is a UserError listing the choices."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UserError(f"unknown arch {name!r}; choose from {sorted(ARCHITECTURES)}") from None
