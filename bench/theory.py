"""Mean-field signal propagation theory for fully connected networks.

Predicts from an init scheme's variances alone how the mean squared preactivation ``q`` evolves
with depth (Poole et al. 2016; Schoenholz et al. 2017). Weights have variance ``sigma_w2 / fan_in``,
biases variance ``sigma_b2``. Expectations over ``z ~ N(0, 1)`` use quadrature split at z = 0.

The same recursion carries over to the residual stream of a residual MLP (:func:`stream_variance`):
each block adds its branch's second moment to the stream's, and a norm in the branch makes that a
constant, so the stream grows linearly with depth.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.errors import UserError

# scipy is imported where it is used, not here: scipy.optimize alone takes ~0.3 s to import, and every
# worker calls predicted_preact_variance (via bench.record) for its first bundle, where relu and tanh
# need neither brentq nor ndtr. That import was most of what turning a bundle into results cost.

Fn = Callable[[np.ndarray], np.ndarray]
Params = Mapping[str, Any] | None
Bias = str | float

# Gauss-Legendre on each half-line [0, 10] (tail mass 1e-23) weighted by the normal density: splitting
# at z = 0 puts relu/selu kinks on the seam and clusters nodes there, resolving saturation at large q too
# (1e-14 up to q = 100; 100-point Gauss-Hermite is 1% off for selu phi', 30% for tanh phi' at q = 30).
_HALF, _HALF_W = np.polynomial.legendre.leggauss(100)
_HALF, _HALF_W = 5.0 * (_HALF + 1.0), _HALF_W * np.exp(-12.5 * (_HALF + 1.0) ** 2)
_NODES = np.concatenate([-_HALF[::-1], _HALF])
_WEIGHTS = np.concatenate([_HALF_W[::-1], _HALF_W]) / (2.0 * _HALF_W.sum())
_Q_FLOOR = 1e-12  # derivatives at q* = 0 are the q -> 0+ limit taken here; smaller fixed points are 0
_Q_HUGE = 1e12  # a variance past this has diverged; derivatives at q* = inf are taken here
_MAX_ITERS = 1000
_CRITICAL_TOL = 1e-9  # |chi1 - 1| within this is criticality: quadrature cannot resolve it further

LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default, which the leaky_relu activation uses
_SLOPE = LEAKY_SLOPE
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _ndtr(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr  # lazily: see the note on scipy at the top

    return ndtr(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form cannot overflow, unlike 1 / (1 + exp(-x))


ACTIVATIONS: dict[str, tuple[Fn, Fn]] = {
    "relu": (lambda x: np.maximum(x, 0.0), lambda x: np.where(x > 0, 1.0, 0.0)),
    "leaky_relu": (lambda x: np.where(x > 0, x, _SLOPE * x), lambda x: np.where(x > 0, 1.0, _SLOPE)),
    "tanh": (np.tanh, lambda x: 1.0 - np.tanh(x) ** 2),
    "linear": (lambda x: x, lambda x: np.ones_like(x)),
    "gelu": (lambda x: x * _ndtr(x), lambda x: _ndtr(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)),
    "selu": (
        lambda x: _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0.0))),
        lambda x: _SELU_SCALE * np.where(x > 0, 1.0, _SELU_ALPHA * np.exp(np.minimum(x, 0.0))),
    ),
    "sigmoid": (_sigmoid, lambda x: _sigmoid(x) * (1.0 - _sigmoid(x))),
}

# torch.nn.init.calculate_gain values; gelu is absent from torch and is computed in activation_gain.
_TORCH_GAINS = {"relu": math.sqrt(2.0), "tanh": 5.0 / 3.0, "selu": 0.75, "sigmoid": 1.0, "linear": 1.0}
_TORCH_GAINS["leaky_relu"] = math.sqrt(2.0 / (1.0 + _SLOPE**2))


def _lookup(registry: Mapping[str, Any], kind: str, name: str) -> Any:
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown {kind} {name!r}; choose from {sorted(registry)}") from None


def _expect(f: Fn, q: float) -> float:
    """E[f(sqrt(q) z)] for z ~ N(0, 1)."""
    return float(_WEIGHTS @ f(math.sqrt(q) * _NODES))


def _second_moment(phi: Fn, q: float) -> float:
    return _expect(lambda u: phi(u) ** 2, q)


def _check_nonnegative(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{name} must be a finite number >= 0, got {value!r}")


def _decay_length(rate: float) -> float:
    if rate >= 1.0:
        return math.inf  # perturbations do not shrink, so there is no finite depth scale
    return 0.0 if rate <= 0.0 else -1.0 / math.log(rate)


def activation_gain(activation: str) -> float:
    """The init gain for `activation` (a name in ACTIVATIONS), as the init registry uses it.

    Returns torch.nn.init.calculate_gain's value (leaky_relu with slope 0.01); for gelu, which PyTorch
    lacks, the second-moment-preserving gain 1 / sqrt(E[gelu(z)^2]), z ~ N(0, 1), about 1.534.
    """
    phi, _ = _lookup(ACTIVATIONS, "activation", activation)
    if activation in _TORCH_GAINS:
        return _TORCH_GAINS[activation]
    return 1.0 / math.sqrt(_second_moment(phi, 1.0))


def variance_map(activation: str, sigma_w2: float, sigma_b2: float, q0: float, depth: int) -> np.ndarray:
    """Mean squared preactivation of each layer of a deep, infinitely wide MLP.

    Convention: layer 1 acts on the raw input x, not on phi(x), so q_1 = sigma_w2 * q0 + sigma_b2
    with q0 = E[x^2] per input coordinate; for l >= 2, q_l = sigma_w2 * E[phi(sqrt(q_{l-1}) z)^2]
    + sigma_b2. This is what a measured MLP's preactivations W_l h_{l-1} + b_l follow.

    Args:
        activation: a name in ACTIVATIONS; depth: the number of layers.
        sigma_w2, sigma_b2: fan_in * Var(w) and Var(b), the same for every layer.
        q0: mean squared input per coordinate.
    Returns:
        Array of length depth holding q_1 .. q_depth.
    """
    phi, _ = _lookup(ACTIVATIONS, "activation", activation)
    _check_nonnegative(sigma_w2=sigma_w2, sigma_b2=sigma_b2, q0=q0, depth=depth)
    q = np.empty(depth)
    moment = float(q0)
    for layer in range(depth):
        q[layer] = sigma_w2 * moment + sigma_b2
        moment = _second_moment(phi, q[layer])
    return q


def fixed_point(activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """The stable fixed point q* that the variance map reaches from q = 1.

    Iterates F(q) = sigma_w2 * E[phi(sqrt(q) z)^2] + sigma_b2 (increasing in q, so the iterates are
    monotone); if they have not settled after 1000 steps (near criticality they crawl), solves
    F(q) = q with brentq on the side they are heading.

    Returns q*; math.inf when q grows past 1e12 with no fixed point (e.g. relu with sigma_w2 > 2);
    0.0 when q collapses to zero (e.g. tanh with sigma_w2 < 1, sigma_b2 = 0) or q* < 1e-12.
    """
    from scipy.optimize import brentq  # lazily: see the note on scipy at the top

    phi, _ = _lookup(ACTIVATIONS, "activation", activation)
    _check_nonnegative(sigma_w2=sigma_w2, sigma_b2=sigma_b2)

    def gap(q: float) -> float:
        return sigma_w2 * _second_moment(phi, q) + sigma_b2 - q

    q = 1.0
    for _ in range(_MAX_ITERS):
        step = gap(q)
        if not q + step < _Q_HUGE:  # also catches nan
            return math.inf
        if abs(step) <= 1e-14 * q:
            return q + step
        q += step
    if gap(q) > 0:
        hi = 2.0 * q
        while gap(hi) > 0 and hi < _Q_HUGE:
            hi *= 2.0
        return math.inf if gap(hi) > 0 else float(brentq(gap, q, hi, xtol=1e-300, rtol=1e-14))
    # F(0) >= 0, so gap(0) == 0 only when phi(0) = 0 and sigma_b2 = 0: then 0 is itself a fixed point
    lo = 0.0 if gap(0.0) > 0 else _Q_FLOOR
    if q <= lo or gap(lo) <= 0:
        return 0.0
    return float(brentq(gap, lo, q, xtol=1e-300, rtol=1e-14))


def chi1(activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """Slope of the correlation map at c = 1: chi1 = sigma_w2 * E[phi'(sqrt(q*) z)^2].

    chi1 < 1 is the ordered phase, chi1 > 1 the chaotic one, chi1 = 1 criticality. When q* is 0 or
    inf, returns the limit q -> 0+ or q -> inf (which exists for the activations that diverge).
    """
    _, dphi = _lookup(ACTIVATIONS, "activation", activation)
    q = fixed_point(activation, sigma_w2, sigma_b2)
    return sigma_w2 * _expect(lambda u: dphi(u) ** 2, min(max(q, _Q_FLOOR), _Q_HUGE))


def _chaotic_rate(phi: Fn, dphi: Fn, sigma_w2: float, sigma_b2: float, q: float) -> float:
    """sigma_w2 * E[phi'(u1) phi'(u2)] at the stable correlation c* < 1 of the chaotic phase."""
    z1, z2 = np.meshgrid(_NODES, _NODES, indexing="ij")
    weights, root_q = np.outer(_WEIGHTS, _WEIGHTS), math.sqrt(q)

    def pair(f: Fn, c: float) -> float:
        u2 = root_q * (c * z1 + math.sqrt(max(1.0 - c * c, 0.0)) * z2)
        return float(np.sum(weights * f(root_q * z1) * f(u2)))

    c = 0.0
    for _ in range(_MAX_ITERS):
        c, previous = min((sigma_w2 * pair(phi, c) + sigma_b2) / q, 1.0), c
        if abs(c - previous) <= 1e-12:
            break
    return sigma_w2 * pair(dphi, c)


def depth_scales(activation: str, sigma_w2: float, sigma_b2: float) -> tuple[float, float]:
    """Depths over which the variance and the correlation settle (Schoenholz et al. 2017).

    xi_q = -1 / log(F'(q*)) with F the variance map. F'(q) = sigma_w2 * E[phi(u) phi'(u) z] / sqrt(q),
    u = sqrt(q) z, equals by Stein's lemma the paper's chi1 + sigma_w2 * E[phi'' phi] but needs no
    phi'', so it holds for relu too. xi_c = -1 / log(chi1) in the ordered phase; in the chaotic phase
    chi1 is replaced by sigma_w2 * E[phi'(u1) phi'(u2)] at the stable correlation c* < 1.

    Returns (xi_q, xi_c); each is inf when its rate is >= 1 (criticality: |chi1 - 1| <= 1e-9 counts
    as 1), and both are inf when q* is inf, since then there is no fixed point to converge to.
    """
    phi, dphi = _lookup(ACTIVATIONS, "activation", activation)
    q = fixed_point(activation, sigma_w2, sigma_b2)
    if math.isinf(q):
        return math.inf, math.inf
    root_q = math.sqrt(max(q, _Q_FLOOR))
    slope = sigma_w2 * _expect(lambda u: phi(u) * dphi(u) * u, root_q**2) / root_q**2
    rate_c = chi1(activation, sigma_w2, sigma_b2)
    if abs(rate_c - 1.0) <= _CRITICAL_TOL:
        rate_c = 1.0
    elif rate_c > 1.0:
        rate_c = _chaotic_rate(phi, dphi, sigma_w2, sigma_b2, q)
    return _decay_length(slope), _decay_length(rate_c)


def critical_sigma_w2(activation: str, sigma_b2: float) -> float:
    """The sigma_w2 at which chi1 == 1 (the edge of chaos) for a given sigma_b2.

    Solves with brentq on [0.1, 20], widening the top up to 1e4 (sigmoid, with phi' <= 1/4, needs
    sigma_w2 >= 16). Returns sigma_w2, e.g. 2 for relu and 1 for tanh at sigma_b2 = 0; UserError if none.
    """
    from scipy.optimize import brentq  # lazily: see the note on scipy at the top

    _lookup(ACTIVATIONS, "activation", activation)

    def excess(sigma_w2: float) -> float:
        return chi1(activation, sigma_w2, sigma_b2) - 1.0

    lo, hi = 0.1, 20.0
    while excess(hi) < 0 and hi < 1e4:
        hi *= 2.0
    if excess(lo) > 0 or excess(hi) < 0:
        raise UserError(f"no critical sigma_w2 in [{lo}, {hi}] for {activation!r} at sigma_b2={sigma_b2}")
    return float(brentq(excess, lo, hi, xtol=1e-12))


def _param(params: Mapping[str, Any], key: str, default: Any) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"param {key!r} must be a number, got {value!r}")
    return float(value)


def _gain(params: Mapping[str, Any], act: str, default: float | str) -> float:
    if params.get("gain", default) == "activation":
        return activation_gain(act)
    return _param(params, "gain", default)


def _kaiming(act: str, fan_in: int, fan_out: int, params: Mapping[str, Any]) -> float:
    scale = _lookup({"fan_in": 1.0, "fan_out": fan_in / fan_out}, "mode", params.get("mode", "fan_in"))
    return _gain(params, act, "activation") ** 2 * scale


# Each rule maps (activation, fan_in, fan_out, params) to sigma_w2 = fan_in * Var(w) for one layer.
def truncated_variance(a: float, b: float) -> float:
    """Variance of N(0, 1) truncated to [a, b]: 0.774 for +-2 (so a +-2 cut keeps 0.880 of the std)."""
    z = _Phi(b) - _Phi(a)
    pa, pb = _phi(a), _phi(b)
    return 1.0 + (a * pa - b * pb) / z - ((pa - pb) / z) ** 2


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _Phi(x: float) -> float:  # noqa: N802 (the standard normal CDF's usual name)
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


SCHEMES: dict[str, Callable[[str, int, int, Mapping[str, Any]], float]] = {
    "default": lambda *_: 1.0 / 3.0,  # nn.Linear: U(+-1/sqrt(fan_in))
    "kaiming_uniform": _kaiming,
    "kaiming_normal": _kaiming,
    "xavier_uniform": lambda act, fi, fo, p: _gain(p, act, 1.0) ** 2 * 2.0 * fi / (fi + fo),
    "xavier_normal": lambda act, fi, fo, p: _gain(p, act, 1.0) ** 2 * 2.0 * fi / (fi + fo),
    # Orthonormal columns (out >= in) give entries variance 1/out, orthonormal rows give 1/in.
    "orthogonal": lambda act, fi, fo, p: _gain(p, act, 1.0) ** 2 * fi / max(fi, fo),
    "zeros": lambda *_: 0.0,
    "scaled_normal": lambda act, fi, fo, p: fi * _param(p, "std", 0.02) ** 2,
    "trunc_normal": lambda act, fi, fo, p: fi * _param(p, "std", 0.02) ** 2 * truncated_variance(
        _param(p, "a", -2.0), _param(p, "b", 2.0)),
    "mean_field": lambda act, fi, fo, p: _param(p, "sigma_w2", 2.0),
    # LSUV rescales each layer until its output has unit variance; for a hidden layer fed by
    # unit-variance preactivations that takes sigma_w2 = 1 / E[phi(z)^2] (2 for relu).
    "lsuv": lambda act, *_: 1.0 / _second_moment(ACTIVATIONS[act][0], 1.0),
}


def _auto_bias(scheme: str, fan_in: int, params: Mapping[str, Any]) -> float:
    # Only nn.Linear's own default draws a bias, U(+-1/sqrt(fan_in)); mean_field takes it as a param.
    if scheme == "mean_field":
        return _param(params, "sigma_b2", 0.0)
    return 1.0 / (3.0 * fan_in) if scheme == "default" else 0.0


# Bias second moment per init_bias mode, from (scheme, fan_in, params).
_BIAS_MODES: dict[str, Callable[[str, int, Mapping[str, Any]], float]] = {
    "auto": _auto_bias,
    "zeros": lambda *_: 0.0,
    "default": lambda scheme, fi, p: 1.0 / (3.0 * fi),  # U(+-1/sqrt(fan_in)) has variance 1/(3 fan_in)
}


def scheme_sigmas(
    scheme: str, activation: str, fan_in: int, fan_out: int, params: Params = None, init_bias: Bias = "auto"
) -> tuple[float, float]:
    """The (sigma_w2, sigma_b2) an init scheme implies for one layer.

    Args:
        scheme, activation: names in SCHEMES and ACTIVATIONS; fan_in, fan_out: the layer's widths.
        params: read are kaiming_* gain (default "activation": activation_gain) and mode (fan_in or
            fan_out); xavier_*/orthogonal gain (1.0, or "activation"); scaled_normal std (0.02);
            mean_field sigma_w2 (2.0) and sigma_b2 (0.0); other keys are ignored. lsuv takes none: it
            gives 1 / E[phi(z)^2], the gain^2 that makes a hidden layer's output variance 1.
        init_bias: "auto" (nn.Linear's draw for `default`, params sigma_b2 for `mean_field`, else
            zeros), "zeros", "default" (U(+-1/sqrt(fan_in)), variance 1/(3 fan_in)), or a constant c,
            which enters as its second moment c^2.
    Returns:
        (sigma_w2, sigma_b2) with sigma_w2 = fan_in * Var(w) and sigma_b2 = E[b^2].
    """
    rule = _lookup(SCHEMES, "scheme", scheme)
    _lookup(ACTIVATIONS, "activation", activation)
    if fan_in < 1 or fan_out < 1:
        raise UserError(f"fan_in and fan_out must be >= 1, got {fan_in!r}, {fan_out!r}")
    params = params or {}
    if isinstance(init_bias, str):
        sigma_b2 = _lookup(_BIAS_MODES, "init_bias", init_bias)(scheme, fan_in, params)
    else:
        sigma_b2 = _param({"init_bias": init_bias}, "init_bias", None) ** 2
    sigma_w2 = float(rule(activation, fan_in, fan_out, params))
    _check_nonnegative(sigma_w2=sigma_w2, sigma_b2=sigma_b2)
    return sigma_w2, sigma_b2


def predicted_preact_variance(
    scheme: str,
    activation: str,
    dims: Sequence[int],
    q0: float,
    params: Params = None,
    init_bias: Bias = "auto",
) -> np.ndarray:
    """Predicted mean squared preactivation of each layer of an MLP at initialization.

    Uses scheme_sigmas per layer (fan_in, fan_out vary) and variance_map's convention: layer 1 sees
    the raw input with second moment q0, later layers E[phi(sqrt(q) z)^2]. For lsuv every layer's
    weight term is normalised to 1, layer 1 included (LSUV rescales on data, whatever q0 is).

    Args:
        scheme, activation, params, init_bias: as for scheme_sigmas; q0: mean squared input entry.
        dims: layer widths [d_in, h1, ..., d_out]; len(dims) = depth + 1.
    Returns:
        Array of length depth, the predicted mean squared preactivation of each layer.
    """
    phi, _ = _lookup(ACTIVATIONS, "activation", activation)
    _check_nonnegative(q0=q0)
    if len(dims) < 2:
        raise UserError(f"dims needs at least 2 widths [d_in, ..., d_out], got {dims!r}")
    q = np.empty(len(dims) - 1)
    moment = float(q0)
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        sigma_w2, sigma_b2 = scheme_sigmas(scheme, activation, fan_in, fan_out, params, init_bias)
        if scheme == "lsuv":
            sigma_w2 = 1.0 / moment if moment > 0 else 0.0
        q[layer] = sigma_w2 * moment + sigma_b2
        moment = _second_moment(phi, q[layer])
    return q


@dataclass(frozen=True)
class Affine:
    """A fully connected layer's second-moment map, E[y^2] = sigma_w2 * E[x^2] + sigma_b2, at init.

    sigma_w2 = fan_in * E[w^2] and sigma_b2 = E[b^2] over the layer's entries, with any scalar that
    multiplies the layer's output (a gate, a head multiplier) and any scalar bias added to it folded in.
    """

    sigma_w2: float
    sigma_b2: float

    def __call__(self, q: float) -> float:
        return self.sigma_w2 * q + self.sigma_b2


@dataclass(frozen=True)
class Branch:
    """A residual branch f(x) = fc2(phi(fc1(norm(x) + c_in)) + c_act) at init, as second moments.

    ``input``: the branch input's second moment as a map of the stream's q: (1, c_in^2) without a
    norm; (0, E[gamma^2] + E[(beta + c_in)^2]) when a BatchNorm or LayerNorm comes first, since either
    rescales its input to unit second moment (eps neglected). ``act_shift``: c_act, the scalar added
    after the activation (Fixup's bias2a).
    """

    input: Affine
    fc1: Affine
    fc2: Affine
    act_shift: float = 0.0


@dataclass(frozen=True)
class ResidualStream:
    """A residual MLP at init: stem, blocks x + f(x), head, as second-moment maps (:func:`stream_variance`).

    ``modules`` names the modules whose outputs the prediction describes, in its order: the stem,
    each block (its output is the stream after it), the head. ``head`` acts on the stream plus
    ``head_shift`` (a scalar bias before the head).
    """

    modules: tuple[str, ...]
    activation: str
    stem: Affine
    blocks: tuple[Branch, ...]
    head: Affine
    head_shift: float = 0.0


def stream_variance(stream: ResidualStream, q0: float) -> np.ndarray:
    """Predicted mean squared output of a residual MLP's stem, stream after each block, and head.

    The stream starts at q_0 = stem(q0). A branch's output is uncorrelated with the stream it is added
    to (its last layer's weights are drawn independently and have mean zero), so the block's output has
    q_{l+1} = q_l + E[f(x)^2], with E[f(x)^2] = fc2(E[(phi(sqrt(p) z) + c_act)^2]), p = fc1(input(q_l)),
    by the mean-field argument: fc1's output is Gaussian across its units at large width. Without a
    norm the branch grows with q_l (relu with He weights: q_{l+1} = 3 q_l); with a norm before fc1 it
    is a constant, and q grows linearly in depth. A zero last layer or gate makes the block the identity.

    Args:
        stream: the model's second-moment maps (read off its initialized weights by the engine).
        q0: mean squared input entry.
    Returns:
        Array of length len(stream.blocks) + 2, in the order of ``stream.modules``.
    """
    phi, _ = _lookup(ACTIVATIONS, "activation", stream.activation)
    _check_nonnegative(q0=q0)
    q = [stream.stem(float(q0))]
    for branch in stream.blocks:
        p = branch.fc1(branch.input(q[-1]))
        moment = _expect(lambda u, c=branch.act_shift: (phi(u) + c) ** 2, p)
        q.append(q[-1] + branch.fc2(moment))
    q.append(stream.head(q[-1] + stream.head_shift**2))
    return np.array(q)
