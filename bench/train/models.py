"""Built-in architectures and activations.

Models are built as plain ``nn.Sequential`` so that initialization always runs
through real PyTorch layers (``default`` calls their own ``reset_parameters``);
the engine then stacks their parameters to train many models at once, using
the functional form of the same activation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bench.train import activations


def activation(name: str) -> tuple[Callable[[], nn.Module], Callable[[torch.Tensor], torch.Tensor]]:
    """(module factory, functional form) of an activation; unknown names fail loudly with the choices."""
    act = activations.get(name)
    return act.module, act.fn


def layer_dims(d_in: int, d_out: int, depth: int, width: int) -> list[int]:
    """Widths of an MLP with ``depth`` linear layers: [d_in, width x (depth - 1), d_out]."""
    return [d_in, *([width] * (depth - 1)), d_out]


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


# Only the MLP is stacked by the engine today; a user factory needs its own issue.
ARCHS: dict[str, Callable[..., nn.Sequential]] = {"mlp": mlp}
