"""Built-in architectures and activations.

Models are built as plain ``nn.Sequential`` so that initialization always runs
through real PyTorch layers (``default`` calls their own ``reset_parameters``);
the engine then stacks their parameters to train many models at once, using
the functional form of the same activation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench import factories
from bench.errors import UserError
from bench.train import activations, architectures, names
from bench.train.names import layer_dims


def activation(name: str) -> tuple[Callable[[], nn.Module], Callable[[torch.Tensor], torch.Tensor]]:
    """(module factory, functional form) of an activation; unknown names fail loudly with the choices."""
    act = activations.get(name)
    return act.module, act.fn


def mlp(d_in: int, d_out: int, depth: int, width: int, act: str) -> nn.Sequential:
    """A ``depth``-layer perceptron: Linear, act, ..., Linear (no activation after the last)."""
    make_act, _ = activation(act)
    dims = layer_dims(d_in, d_out, depth, width)
    modules: list[nn.Module] = []
    for i in range(depth):
        modules.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            modules.append(make_act())
    return nn.Sequential(*modules)


def preactivations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each linear layer's output on ``x``, in order (what LSUV normalizes)."""
    outs = []
    for module in model:
        x = module(x)
        if isinstance(module, nn.Linear):
            outs.append(x)
    return outs


def skeleton(arch: str, depth: int) -> nn.Module:
    """A built-in architecture on the meta device, for its parameter names and shapes only.

    Nothing is drawn (the global RNG is untouched) and nothing is allocated; the names depend
    on the depth alone (an MLP: "0.weight", "0.bias", "2.weight", ...).
    """
    with torch.device("meta"):
        return ARCHS[arch](1, 1, depth, 1, "linear")


# The MLP, trained by the hand-stacked engine (bench.train.stacked); every other architecture, built-in
# (bench.train.architectures) or a user's "pkg.module:fn", by the engine for any module (functional).
ARCHS: dict[str, Callable[..., nn.Sequential]] = {"mlp": mlp}


def factory(arch: str) -> Callable[..., nn.Module]:
    """The factory ``fn(in_shape, out_dim, **settings)`` of a non-MLP architecture (built-in or user's)."""
    if arch in architectures.ARCHITECTURES:
        return architectures.ARCHITECTURES[arch]
    if factories.is_factory(arch):
        return factories.load(arch, "[model] arch")
    raise UserError(f"arch = {arch!r}: unknown; choose from {names.arch_names()} or 'pkg.module:function'")


def build(arch: str, in_shape: tuple[int, ...], out_dim: int, settings: dict[str, Any]) -> nn.Module:
    """Call a non-MLP architecture's factory; anything but an nn.Module back is an error (the job's)."""
    model = factory(arch)(in_shape=tuple(in_shape), out_dim=int(out_dim), **settings)
    if not isinstance(model, nn.Module):
        raise TypeError(f"arch = {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
