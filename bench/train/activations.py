"""The one activation registry: module, functional and in-place forms, negative slope, init gain.

Models build their layers from ``module``, the stacked engine calls ``fn`` (or ``inplace``
on steps that keep no preactivations), and Kaiming schemes scale by ``gain``, which comes
from :func:`bench.theory.activation_gain` (torch.nn.init.calculate_gain's values; for gelu,
which PyTorch lacks, 1 / sqrt(E[gelu(z)^2])), so theory and the inits use the same number.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from bench import theory
from bench.errors import UserError

Fn = Callable[[torch.Tensor], torch.Tensor]
LEAKY_SLOPE = theory.LEAKY_SLOPE  # torch.nn.LeakyReLU's default negative slope


@dataclass(frozen=True)
class Activation:
    """One activation in every form the project uses."""

    name: str
    module: Callable[[], nn.Module]  # a fresh nn.Module, for models built as real modules
    fn: Fn  # the functional form, for engines that do not call modules
    # The in-place form, where autograd allows it: its backward needs only the output (not gelu,
    # selu). None: use ``fn``.
    inplace: Fn | None = None
    slope: float | None = None  # negative slope (leaky_relu)

    @property
    def gain(self) -> float:
        """The gain Kaiming schemes use (bench.theory.activation_gain)."""
        return _gain(self.name)


@functools.cache  # gelu's is a quadrature, asked for by every layer of every gelu model
def _gain(name: str) -> float:
    return theory.activation_gain(name)


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("relu", nn.ReLU, F.relu, torch.relu_),
    Activation("tanh", nn.Tanh, torch.tanh, torch.tanh_),
    Activation("gelu", nn.GELU, F.gelu),
    Activation("leaky_relu", lambda: nn.LeakyReLU(LEAKY_SLOPE), lambda x: F.leaky_relu(x, LEAKY_SLOPE),
               lambda x: F.leaky_relu_(x, LEAKY_SLOPE), slope=LEAKY_SLOPE),
    Activation("selu", nn.SELU, F.selu),
    Activation("sigmoid", nn.Sigmoid, torch.sigmoid, torch.sigmoid_),
    Activation("linear", nn.Identity, lambda x: x, lambda x: x),
)}


def get(name: str) -> Activation:
    """The activation called ``name``; an unknown name is a UserError listing the choices."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UserError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None
