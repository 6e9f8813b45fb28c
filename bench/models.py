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
from torch.nn import functional as F

from bench.errors import UserError
from bench.inits import LEAKY_SLOPE

# name -> (module factory for nn.Sequential, functional form for the stacked engine)
ACTIVATIONS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    "relu": (nn.ReLU, F.relu),
    "tanh": (nn.Tanh, torch.tanh),
    "gelu": (nn.GELU, F.gelu),
    "leaky_relu": (lambda: nn.LeakyReLU(LEAKY_SLOPE), lambda x: F.leaky_relu(x, LEAKY_SLOPE)),
    "selu": (nn.SELU, F.selu),
    "sigmoid": (nn.Sigmoid, torch.sigmoid),
    "linear": (nn.Identity, lambda x: x),
}

# In-place forms, for steps that keep no preactivations: each one's backward needs only its
# output, so autograd allows overwriting the input (GELU's needs the input: not here).
INPLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "leaky_relu": lambda x: F.leaky_relu_(x, LEAKY_SLOPE),
    "sigmoid": torch.sigmoid_,
    "linear": lambda x: x,
}


def activation(name: str) -> tuple[Callable[[], nn.Module], Callable[[torch.Tensor], torch.Tensor]]:
    """Look up an activation; unknown names fail loudly with the choices."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UserError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None


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


# Only the MLP is stacked by the engine today; a user factory needs its own issue.
ARCHS: dict[str, Callable[..., nn.Sequential]] = {"mlp": mlp}
